"""Step 1 — texts → activation store.

Runs every example through the model on its own (the FAST way: no token
attends to another example), packed into rows or batched by length for speed,
and writes the activations at the chosen layers to
`OUTPUT_DIR/<model>/<hook>/`. Edit the constants below or override any of
them on the command line (`python extract_activations.py --layers 6 12`);
`--help` lists them all. A rerun with the same settings resumes.
"""

# --- What to read -----------------------------------------------------------
MODEL_NAME = "embedded:smollm2-135m-instruct"  # embedded default, a folder, a .gguf file, or a hub id
DATASET = "data/cognitive_actions.jsonl"  # JSONL (or a .json array) / CSV / Parquet, or a saved HF dataset folder
TEXT_FIELD = "auto"  # auto: text, content, prompt or messages
RESPONSE_FIELD = ""  # optional assistant response field
LABEL_FIELD = "auto"  # kept per example for the interpretation step
CHAT_TEMPLATE = "auto"  # auto: apply the instruct model's chat template; none: plain text

# --- Where in the model -----------------------------------------------------
LAYERS = [12]  # layer L = output of decoder block L (HF hidden_states[L + 1]); ignored for HOOK_POINT = "lora"
HOOK_POINT = "resid_post"  # resid_post, mlp_out, attn_out, or lora (a LoRA adapter's rank-r bottlenecks, all its layers)
LORA_ADAPTER = ""  # for HOOK_POINT = "lora": a PEFT LoRA adapter folder made for MODEL_NAME
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # adapted types stored, in this order
MAX_LENGTH = 512  # longer examples are truncated and counted

# --- How ---------------------------------------------------------------------
PACKING = "sequential"  # sequential: one example per sequence (FAST); block: the block-training baseline
BLOCK_SIZE = 128  # tokens per block for PACKING = "block"
BATCH_TOKENS = 0  # tokens per forward batch, padding included; 0: 32768 on a GPU, 8192 on the CPU
BATCHING = "auto"  # packed: examples end to end in rows, no padding, attention kept within each; padded: length batches; auto: packed where the model supports it
ROW_TOKENS = 0  # tokens per packed row; 0: the width that needs the fewest FLOPs (the whole batch with flash or flex attention)
ATTENTION = "auto"  # auto: flex_attention for packed rows of 10M+ tokens on a GPU, else the model's own; or sdpa, eager, ...
STORAGE_DTYPE = "float16"  # float16, bfloat16 or float32 on disk
COMPUTE_DTYPE = "auto"  # auto: bfloat16 on GPU, float32 on CPU
DEVICE = "auto"
OUTPUT_DIR = "activations"
SHARD_MB = 256.0  # size of one activation shard file
MAX_EXAMPLES = 0  # 0: all
OVERWRITE = False  # replace a store made with different settings

if __name__ == "__main__":
    from fastsae.common.config import run_step
    from fastsae.extract.extract_activations import ExtractConfig, extract_activations

    run_step(ExtractConfig, globals(), extract_activations, description=__doc__)
