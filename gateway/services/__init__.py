"""Long-running services beside the SSH server: culler, users reloader, admin socket."""
