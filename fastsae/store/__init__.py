"""The activation store: sharded arrays, its manifest, and the batches that stream from it."""
