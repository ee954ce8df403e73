"""Quorum witness: per-group owners, epochs and failover decisions."""
