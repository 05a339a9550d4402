"""The SAE itself, its checkpoint and typed record, opening a trained one, and its SAELens form."""
