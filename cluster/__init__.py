"""sept.cluster: everything Ray: actor pools for embedding, encoding and searching, the retrieval coordinator."""
