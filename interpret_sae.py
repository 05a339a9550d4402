"""Step 3 — SAE checkpoint + store → interpretations.csv.

One streaming pass over the store gives each feature's frequency, activation statistics and
top-activating tokens; the CSV gets, per chosen feature, its top contexts (firing token in
«guillemets»), the tokens its decoder direction promotes and suppresses (logit lens), the label
it fires on most with that label's AUROC, and — with an API key — the LLM scoring chosen by SCORING:
an explanation and its detection score, the FAST paper's 1–5 rubric rating and a name, or both
(the run logs the headline: the share of features rated 4–5). Key: OPENAI_API_KEY (or OPENAI_KEY_SAE); OPENAI_BASE_URL for vLLM, Ollama or
another OpenAI-compatible server. Answers are cached, so reruns cost nothing. Beside the CSV
goes `dashboard.html`, one self-contained page to sort, filter and read the features.
"""

CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"
FEATURES = "frequency:100"  # all, frequency:N, label:N, random:N, or "3,17,42"
TOP_CONTEXTS = 5
CONTEXT_WINDOW = 12
INTERPRETATIONS_PATH = "interpretations.csv"
EXPLAIN = True  # ask the LLM when a key is set; without one its columns stay empty
# detection (explain, then label held-out excerpts: 2 requests a feature), fast-rubric (the FAST paper's 1-5
# rating of the top contexts: 1 request), or both: they measure different things and the rubric adds a third.
SCORING = "both"
EXPLANATION_MODEL = "gpt-4.1"
EXPLAIN_CONTEXTS = 10  # top contexts shown to the LLM
SCORE_CONTEXTS = 5  # held-out activating contexts (and as many silent ones) for the score
RUBRIC_CONTEXTS = 5  # top contexts the FAST rubric rates (the paper shows 5)
LLM_CONCURRENCY = 4
DEVICE = "auto"

if __name__ == "__main__":
    from fastsae.config import run_step
    from fastsae.interpret import InterpretConfig, interpret_sae

    run_step(InterpretConfig, globals(), interpret_sae, description=__doc__)
