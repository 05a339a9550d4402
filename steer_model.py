"""After training — steer the model with SAE features (the FAST paper, section 6).

Generates an answer to each prompt while a forward hook at the checkpoint's hook (layer L = the
output of decoder block L) moves the activations along the chosen features' decoder directions:
MODE add gives h + α·d_k (one column per α in STRENGTHS; the paper found gains around 15–100 and
incoherence beyond), clamp sets the features to CLAMP_VALUE, ablate removes them. The model,
hook and chat template come from the checkpoint. Prints the prompt × strength table and writes it
as Markdown and as one self-contained HTML page. Details in fastsae/tools/steer_model.py and docs/steer.md.
"""

CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"
PROMPTS = [
    "What are you planning to do this weekend?",
    "Describe the city you live in.",
    "Should I take the new job offer?",
]
PROMPTS_FILE = ""  # a JSONL/CSV/Parquet file of prompts (text, prompt or messages); replaces PROMPTS
TEXT_FIELD = "auto"  # for PROMPTS_FILE: text, content, prompt or messages
FEATURES = [201]  # feature ids, e.g. from interpretations.csv; several are summed
MODE = "add"  # add | clamp | ablate
STRENGTHS = [0, 15, 25, 50, 100]  # MODE add: α per column, a distance along the unit direction (token norms ~140 here)
CLAMP_VALUE = 20.0  # MODE clamp: the activation the features are set to
MAX_NEW_TOKENS = 40
TEMPERATURE = 0.0  # 0: greedy
SEED = 0
MARKDOWN_PATH = "steering.md"
HTML_PATH = "steering.html"
MODEL_NAME = ""  # empty: the checkpoint's model
HOOK_POINT = ""  # only for an SAE that does not record its hook: resid_post, mlp_out or attn_out
LAYER = -1  # likewise; -1: the SAE's
DEVICE = "auto"

if __name__ == "__main__":
    from fastsae.common.config import run_step
    from fastsae.tools.steer_model import SteerConfig, steer_model

    run_step(SteerConfig, globals(), steer_model, description=__doc__)
