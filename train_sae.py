"""Step 2 — activation store → SAE checkpoint(s), metrics and training curves.

Streams batches from the store written by extract_activations.py, trains a
Top-K SAE (or BatchTopK, ReLU, JumpReLU; Matryoshka prefixes; a sweep of
several on the same batches) and writes `OUTPUT_DIR/<run>/<SAE name>/` with a
checkpoint HypotheSAEs' `load_model` opens, `metrics.json` and
`training_curves.png`. Edit the constants below or override them on the
command line (`python train_sae.py --m 512 --k 16`); `--help` lists them all.
A rerun with the same settings resumes; Ctrl-C saves before it exits.
"""

# --- Data ----------------------------------------------------------------------
STORE = "activations/SmolLM2-135M-Instruct/blocks.12.hook_resid_post"  # written by step 1
VALIDATION_FRACTION = 0.1  # examples held out (split by example, never by token)
INCLUDE_SPECIAL_TOKENS = False  # BOS / chat-template tokens are left out by default

# --- The SAE -------------------------------------------------------------------
ARCHITECTURE = "topk"  # topk, batchtopk, relu or jumprelu
M = 256  # features
K = 8  # active features per token (topk, batchtopk)
MATRYOSHKA_PREFIXES = []  # e.g. [64, 256]
SWEEP = []  # e.g. ["topk:256:8", "batchtopk:512:16", "topk:256:8:64-256"]: one pass trains them all
AUX_K = -1  # dead features used by the aux-K loss; -1: 2K
DEAD_AFTER_TOKENS = 0  # 0: a tenth of the run

# --- Optimisation --------------------------------------------------------------
BATCH_SIZE = 1024  # under torchrun: all ranks together
LEARNING_RATE = 2e-3
EPOCHS = 50.0
MAX_TOKENS = 0  # set to override EPOCHS
PATIENCE = 10  # validations without a better objective (FVU, plus relu's/jumprelu's penalty) before an SAE stops
SEED = 0
PRECISION = "auto"  # auto: bfloat16 autocast on a GPU or a CPU with AMX/AVX512-BF16, else float32; weights stay float32

# --- Output --------------------------------------------------------------------
OUTPUT_DIR = "checkpoints"
RUN_NAME = ""  # empty: <model>_<hook>
DEVICE = "auto"

# --- Tracking (docs/train.md#tracking) -------------------------------------------
LOGGER = "none"  # none, wandb (offline unless WANDB_MODE is set; `wandb sync` uploads later) or tensorboard
LOGGER_PROJECT = "fastsae"  # W&B project; each SAE is a run, grouped by its run folder (RUN_NAME)
LOGGER_DIR = ""  # empty: each SAE's folder (wandb/, tensorboard/ beside its checkpoint)

if __name__ == "__main__":
    from fastsae.common.config import run_step
    from fastsae.train.train_sae import TrainConfig, train_saes

    run_step(TrainConfig, globals(), train_saes, description=__doc__)
