"""Step 2b — SAE checkpoint + store (+ model) → SAEBench-style metrics.

Reconstruction (MSE, FVU, cosine; by token kind), the FAST paper's token MSE and
MSE_st (raw and log2), sparsity (L0, L1, density, dead and dense features),
loss recovered / relative loss increase / KL with the SAE spliced into the
model, and the decoder's geometry, on the training run's held-out examples.
Writes eval.json and feature_density.png beside the checkpoint. The formulas
are in fastsae/evaluate.py and the README.
"""

CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"
STORE = ""  # empty: the store the checkpoint was trained on
MODEL_NAME = ""  # empty: the store's model
MODEL_METRICS = True  # load the model for loss recovered and KL
MAX_EXAMPLES = 0  # 0: every held-out example
DEVICE = "auto"

if __name__ == "__main__":
    from fastsae.config import run_step
    from fastsae.evaluate import EvalConfig, evaluate_sae

    run_step(EvalConfig, globals(), evaluate_sae, description=__doc__)
