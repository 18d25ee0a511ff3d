"""Per-user environments: the contract (`base`) and its implementations (`docker`, `fake`)."""

from .base import (
    Backend,
    BackendError,
    EnvState,
    EnvStats,
    Limits,
    Listener,
    Process,
    ProcessSpec,
    Share,
    SocketListener,
)

__all__ = ["Backend", "BackendError", "EnvState", "EnvStats", "Limits", "Listener", "Process",
           "ProcessSpec", "Share", "SocketListener"]
