"""Step 3 — SAE checkpoint + store → interpretations.csv.

One streaming pass over the store gives each feature's frequency, activation statistics and
top-activating tokens; the CSV gets, per chosen feature, its top contexts (firing token in
«guillemets»), the tokens its decoder direction promotes and suppresses (logit lens), and the
label it fires on most with that label's AUROC. LLM explanations, their scores and the HTML
dashboard are not part of this version yet (their columns are empty).
"""

CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"
FEATURES = "frequency:100"  # all, frequency:N, label:N, or "3,17,42"
TOP_CONTEXTS = 5
CONTEXT_WINDOW = 12
INTERPRETATIONS_PATH = "interpretations.csv"
DEVICE = "auto"

if __name__ == "__main__":
    from fastsae.config import run_step
    from fastsae.interpret import InterpretConfig, interpret_sae

    run_step(InterpretConfig, globals(), interpret_sae, description=__doc__)
