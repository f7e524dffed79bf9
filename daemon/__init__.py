"""cloudfsd: the block storage daemon (upload, fetch, eviction, backup)."""
