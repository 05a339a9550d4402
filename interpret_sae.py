"""Step 3 — SAE checkpoint + store → interpretations.csv.

One streaming pass over the store gives each feature's frequency, activation statistics and
example-level maxima; a second, over the chosen features only, their activating windows (each
example cut into WINDOW_TOKENS-token windows, as delphi cuts them). The CSV gets, per chosen
feature, its strongest windows (strongest token in «guillemets»), the tokens its decoder
direction promotes and suppresses (logit lens), the label it fires on most with that label's
AUROC, and — with an API key — the LLM scores chosen by SCORING: delphi's detection and fuzzing
(an explanation from windows sampled across the activation quantiles, scored on held-out ones,
with the accuracy per quantile) and the FAST paper's 1–5 rubric rating and a name (the run logs
the share rated 4–5). Key: OPENAI_API_KEY (or OPENAI_KEY_SAE); OPENAI_BASE_URL for vLLM, Ollama
or another OpenAI-compatible server. The request count and a token estimate are logged before
anything is sent; answers are cached, so reruns cost nothing. Beside the CSV goes
`dashboard.html`, one self-contained page to sort, filter and read the features.
"""

CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"
FEATURES = "frequency:100"  # all, frequency:N, label:N, random:N, or "3,17,42"
TOP_CONTEXTS = 5  # strongest windows per feature in the CSV, one per window
WINDOW_TOKENS = 32  # each example is cut into windows this long (delphi's example_ctx_len)
INTERPRETATIONS_PATH = "interpretations.csv"
EXPLAIN = True  # ask the LLM when a key is set; without one its columns stay empty
# Any of: detection and fuzzing (delphi's scores: 1 explaining request, then the 2 × SCORE_EXAMPLES held-out
# windows EXAMPLES_PER_PROMPT to a request, 20 each by default) and fast-rubric (the FAST paper's 1-5 rating
# of the top windows: 1 request). They measure different things: see docs/interpret.md.
SCORING = "detection,fuzzing,fast-rubric"
EXPLANATION_MODEL = "gpt-4.1"
EXPLAIN_EXAMPLES = 40  # activating windows the explainer sees (from the quantiles: a multiple of N_QUANTILES)
EXPLAIN_FROM = "quantiles"  # quantiles (evenly across the activation quantiles, as delphi) or top
SCORE_EXAMPLES = 50  # held-out activating windows per scorer, a multiple of N_QUANTILES (and as many non-activating)
N_QUANTILES = 10
MIN_WINDOWS = 200  # a feature with fewer activating windows is reported as too rare to score
EXAMPLES_PER_PROMPT = 5
RUBRIC_CONTEXTS = 5  # top windows the FAST rubric rates (the paper shows 5)
LLM_CONCURRENCY = 4
DEVICE = "auto"

if __name__ == "__main__":
    from fastsae.common.config import run_step
    from fastsae.interpret.interpret_sae import InterpretConfig, interpret_sae

    run_step(InterpretConfig, globals(), interpret_sae, description=__doc__)
