"""Step 2: activation store -> SAE checkpoints."""
