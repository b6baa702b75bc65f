"""Ferry's host agent: the replication engine and control plane of one host."""
