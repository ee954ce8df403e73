"""syncd: synchronous active-active block replication served over NBD."""

__version__ = "0.1.0"


def version() -> str:
    """The installed distribution's version ("unknown" when run from a tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("syncd")
    except PackageNotFoundError:
        return "unknown"
