"""Sharing a trained SAE: an export folder with SAELens' layout, a model card, a Hugging Face upload."""
