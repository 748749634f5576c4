"""Models from the hub and from disk: aliases (model cards), fetching the bundled SmolLM2-135M, loading, identity hashes."""
