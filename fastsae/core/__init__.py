"""The SAE itself and its checkpoint."""
