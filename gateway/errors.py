"""The one error family: what the user sees, what the log gets, and a short reason label.

Every failure that can reach a user's terminal is a `GatewayError`.  `user_message` is safe to
print on her stderr (it never names internals), `str(exc)` is the log text, and `reason` is a
short stable label used in audit events and as a metrics label.
"""

from __future__ import annotations

import os


class GatewayError(Exception):
    """A failure with a user-safe message, a log message and a reason label."""

    def __init__(self, user_message: str, log_message: str | None = None,
                 reason: str = "error") -> None:
        super().__init__(log_message or user_message)
        self.user_message = user_message
        self.reason = reason


def os_reason(exc: OSError) -> str:
    """"Connection refused", not asyncio's "Connect call failed (...)": the words for a user."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
