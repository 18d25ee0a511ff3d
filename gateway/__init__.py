"""dind-gateway: an SSH gateway to per-user Docker-in-Docker environments (README: module map)."""
