"""syncd: synchronous active-active block replication served over NBD."""

__version__ = "0.1.0"
