"""sept.data: WebDataset reading and writing, sample identity, pool and target readers, the demo corpus."""
