"""Data files shipped with the package: the DinD image context, the config examples and the
offline image build script.

In a wheel they are copied into this package (setup.py maps ``gateway.share.dind`` to
``images/dind/``, ``gateway.share.config`` to ``config/``, ``gateway.share.scripts`` to
``scripts/``, ``gateway.share.packaging`` to ``packaging/``: the systemd unit, the
Prometheus, alert and Grafana files); in a checkout (or an editable install) they are
read where they live.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CHECKOUT = {"dind": ("images", "dind"), "config": ("config",), "scripts": ("scripts",),
             "packaging": ("packaging",)}
NAMES = tuple(_CHECKOUT)


def path(name: str) -> Path:
    """Directory of one data set: ``dind``, ``config``, ``scripts`` or ``packaging``."""
    if name not in _CHECKOUT:
        raise KeyError(f"no data set {name!r}; one of {', '.join(NAMES)}")
    installed = _HERE / name
    if installed.is_dir():
        return installed
    checkout = _HERE.parents[1].joinpath(*_CHECKOUT[name])
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"data set {name!r} is missing (neither {installed} nor {checkout})")
