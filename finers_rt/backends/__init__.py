"""Backends: implementations of the `Generator` (VLM stages) and `SegmentPredictor` (SAM2) seams.

Each backend module imports its heavy dependencies itself; a missing one raises
`BackendUnavailable` naming the extra to install.
"""
from __future__ import annotations


class BackendUnavailable(ImportError):
    """A backend's dependencies are not installed; the message names the pip extra."""


def require(module: str, extra: str):
    """Import `module` or raise BackendUnavailable telling the user which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(
            f"{module} is needed by this backend but could not be imported ({e}). "
            f"Install it with: pip install 'finers-rt[{extra}]' (see README, 'Install')."
        ) from e
