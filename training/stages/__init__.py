"""The recipe's stages, each its own module: prepare (IDs, tokenizer, prior, backbone), align,
reason (the curriculum), srpo; validation measures them and writes their snapshot bundles."""
