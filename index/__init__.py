"""sept.index: FAISS index specs, training, shard encoding, the Zarr layout, shard search, exact top-k merge."""
