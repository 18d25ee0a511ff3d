"""What the gateway tells the world: typed events, the audit log, Prometheus metrics."""
