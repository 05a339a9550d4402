"""Step 2b: SAEBench's core metrics and ours for trained SAEs."""
