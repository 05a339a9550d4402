"""Sharing a trained SAE: SAELens' format, a model card, a Hugging Face upload."""
