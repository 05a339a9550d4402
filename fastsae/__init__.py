"""fastsae: train sparse autoencoders on language-model activations, the FAST way."""

__version__ = "0.1.0"
