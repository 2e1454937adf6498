"""Data: the shard schema, shard writing and reading, and the sources that produce samples."""
