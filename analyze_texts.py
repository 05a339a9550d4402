"""After training — read texts through the SAE: which features fire on each text, and on which tokens.

Each text goes through the model exactly as extraction did for this checkpoint (chat template,
hook, layer, MAX_LENGTH, special tokens: all read from the checkpoint), then through the SAE.
Prints each text's TOP_N features (with explanations and labels from interpret_sae.py's
interpretations.csv when it is there) and writes a CSV (one row per text), a PNG heatmap of
texts × features and an HTML page of per-token heatmaps. A HypotheSAEs checkpoint records no
model or hook: set MODEL_NAME, HOOK_POINT and LAYER for it.
"""

CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"
TEXTS_FILE = ""  # JSONL / CSV / Parquet (or a saved HF dataset); empty: TEXTS below
TEXTS = [
    "I was sure the plan would work, but now I doubt it.",
    "Tomorrow I will compare the two offers before I decide.",
    "Looking back, I should have asked for help sooner.",
]
TEXT_FIELD = "auto"  # for TEXTS_FILE: text, content, prompt or messages
POOLING = "max"  # max or mean over each text's tokens
TOP_N = 10  # features reported per text
INTERPRETATIONS = "interpretations.csv"  # interpret_sae.py's output for this SAE; skipped when missing
CSV_PATH = "text_features.csv"
HEATMAP_PATH = "text_features.png"
HTML_PATH = "text_features.html"
DEVICE = "auto"

# --- Only for a checkpoint that does not record them (HypotheSAEs') -----------
MODEL_NAME = ""  # also points at a moved copy of the checkpoint's model
HOOK_POINT = ""  # resid_post, mlp_out or attn_out
LAYER = -1

if __name__ == "__main__":
    from fastsae.common.config import run_step
    from fastsae.tools.analyze_texts import AnalyzeConfig, analyze_texts

    run_step(AnalyzeConfig, globals(), analyze_texts, description=__doc__)
