"""The local cluster launcher: `aisrl up` (settings, topology, supervisor, progress, report)."""
