"""Where each step writes by default, and so where the next step reads: one home, so the steps agree.

The step scripts keep their own copies in their UPPER_CASE constants on purpose: those are
the values a user edits, and the script reads as a self-contained recipe.
"""

DEFAULT_STORE = "activations/SmolLM2-135M-Instruct/blocks.12.hook_resid_post"
DEFAULT_CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"
DEFAULT_INTERPRETATIONS = "interpretations.csv"
