"""Text in, training shards out: sources, cleaning, de-duplication, splitting, tokenized shards, loaders."""
