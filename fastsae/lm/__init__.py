"""Language models: loading, hook points, LoRA adapters, tokenization, the texts, and re-entering a model at a block."""
