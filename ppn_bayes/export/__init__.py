"""From a keep-set to a smaller model: the lazy sliced export to a standard checkpoint, loading it back, and in-memory switching between sizes."""
