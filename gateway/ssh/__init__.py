"""The SSH side: listener connections, the session data path, forwarding, admission."""
