"""SAEs saved by other libraries (SAELens, sparsify, dictionary_learning), read into our SparseAutoencoder.

`sources.py` decides which reader a CHECKPOINT needs; each library's reader is a module of its own.
"""
