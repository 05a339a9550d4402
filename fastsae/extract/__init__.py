"""Step 1: texts -> activation store."""
