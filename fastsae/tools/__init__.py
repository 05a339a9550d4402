"""Tools on a trained SAE: read new texts through it, steer the model with its features."""
