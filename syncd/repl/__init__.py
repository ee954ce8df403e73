"""Replication between the two storage nodes: wire codec, link paths, write mirroring, resync."""
