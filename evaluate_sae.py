"""Step 2b — SAE checkpoints + store (+ model) → metrics, ours and SAEBench's core.

SAEBench's core metrics exactly as sae-bench 0.6.0 defines them (ce_loss_score,
kl_div_score, its explained_variance, mse, l2_ratio, relative_reconstruction_bias,
l0, l1, ...), in its own JSON format, on a budget of held-out tokens with 95%
intervals; beside them ours on every held-out example: FVU and cosine by token
kind, the FAST paper's token MSE and MSE_st (raw and log2), sparsity and
density, the decoder's geometry. Writes eval.json and feature_density.png beside
each checkpoint. Several checkpoints (a sweep) share one pass of the model, and
the clean and zero-ablated passes are saved in the store folder for reruns.
With EVALS = "core,sparse_probing", also SAEBench's k-sparse probing on the dataset's labels (each label against
the rest, under SAEBench's names; all together, under names of its own) on the same split: sparse_probing.json and
sparse_probing.png. With absorption in EVALS, SAEBench's first-letter feature absorption: absorption.json.
The formulas are in fastsae/evaluate/evaluate_sae.py, fastsae/evaluate/saebench_core.py,
fastsae/evaluate/sparse_probing.py, fastsae/evaluate/absorption.py and docs/evaluate.md.
"""

CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"  # or a list: a sweep
STORE = ""  # empty: the store the checkpoint was trained on
MODEL_NAME = ""  # empty: the store's model
MODEL_METRICS = True  # load the model for SAEBench's core metrics
MODEL_TOKENS = 20_480  # held-out tokens for the model metrics (SAEBench's default); 0: all
MAX_EXAMPLES = 0  # our store metrics on at most N held-out examples; 0: all
EVALS = "core"  # any of core (eval.json), sparse_probing (k-sparse probes on the data's labels), absorption; e.g. "core,sparse_probing"
ABSORPTION_WORDS = -1  # absorption's spelling task: words sampled; -1: all on a GPU, 1,000 on the CPU; 0: all
DEVICE = "auto"
LOGGER = "none"  # none, wandb or tensorboard: the headline metrics as a run's summary, as training logs (docs/train.md#tracking)
LOGGER_PROJECT = "fastsae"  # the same project as training's
LOGGER_DIR = ""  # empty: the SAE's results folder, beside eval.json

if __name__ == "__main__":
    from fastsae.common.config import run_step
    from fastsae.evaluate.evaluate_sae import EvalConfig, evaluate_sae

    run_step(EvalConfig, globals(), evaluate_sae, description=__doc__)
