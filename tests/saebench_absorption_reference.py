"""SAEBench's own absorption evaluation (sae-bench 0.6.0, `evals/absorption/main.py`'s `run_eval`), run offline on an in-memory
model and SAE: the reference `fastsae/evaluate/absorption.py` is checked against.

Everything that computes a number is SAEBench's (its probes, k-sparse probing, feature-absorption calculator and
aggregation), SAELens' (the SAE) or TransformerLens' (the model, built by `saebench_reference.hooked_transformer_from_hf`,
here with the tokenizer attached: the spelling prompts are text). This module only wires them together:

- `run_eval` loads its model by name with `HookedTransformer.from_pretrained_no_processing`: that returns the model given.
- SAEBench's vocabulary is every alphabetic token of the tokenizer (`get_alpha_tokens`); it returns the words given, so a
  test can run on a few hundred. The model still reads each prompt with its own tokenizer.
- Its probes and intermediate tables are cached under folders that default to its package's own directory: they go to a
  temporary folder, and `run_eval`'s `artifacts/absorption` (relative to the working directory) too.
- Its random draws use the global `random` and torch generators, unseeded: `random_seed` seeds Python's before the letter
  probe's data is made, torch's before the letter probe and again before the k-sparse probes, as fastsae seeds its own.
  The letter probe is trained first (`load_or_train_probe`, which caches it) so that the second seed falls between them.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
import sae_bench.evals.absorption.common as saebench_common
import sae_bench.evals.absorption.feature_absorption as saebench_feature_absorption
import sae_bench.evals.absorption.k_sparse_probing as saebench_k_sparse_probing
import sae_bench.evals.absorption.main as saebench_absorption
import torch
from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
from transformer_lens import HookedTransformer

from saebench_reference import hooked_transformer_from_hf, saelens_sae


def saebench_absorption_reference(
    hf_model,
    tokenizer,
    layer: int,
    sae_weights: dict[str, torch.Tensor],
    k: int,
    words: list[str],
    random_seed: int,
    min_gt_probe_f1: float,
    min_feats_for_eval: int,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """SAEBench's `AbsorptionEvalOutput` (as a dict) for a Top-K SAE on `blocks.{layer}.hook_resid_post`, and its k-sparse
    probing table (per letter: `f1_probe`, `split_feats`, `f1_sparse_sae_{k}`, ...). An empty dict when SAEBench's gate
    (`min_feats_for_eval` letters with probe F1 above `min_gt_probe_f1`) stops it."""
    model = hooked_transformer_from_hf(hf_model)
    model.set_tokenizer(tokenizer, default_padding_side="right")
    hook = f"blocks.{layer}.hook_resid_post"
    sae = saelens_sae(sae_weights, "topk", k, hook, model.cfg.model_name, context_size=128)
    config = AbsorptionEvalConfig(
        model_name=model.cfg.model_name,
        random_seed=random_seed,
        llm_dtype="float32",
        min_GT_probe_f1=min_gt_probe_f1,
        min_feats_for_eval=min_feats_for_eval,
    )
    previous_folder = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="saebench-absorption-") as name:
        folder = Path(name)
        probes, k_sparse, absorption = folder / "probes", folder / "k_sparse_probing", folder / "feature_absorption"
        patches = [
            mock.patch.object(saebench_common, "get_alpha_tokens", lambda _tokenizer: list(words)),
            mock.patch.object(saebench_feature_absorption, "get_alpha_tokens", lambda _tokenizer: list(words)),
            mock.patch.object(
                saebench_absorption,
                "run_k_sparse_probing_experiment",
                partial(saebench_k_sparse_probing.run_k_sparse_probing_experiment, experiment_dir=k_sparse, probes_dir=probes),
            ),
            mock.patch.object(
                saebench_absorption,
                "run_feature_absortion_experiment",
                partial(
                    saebench_feature_absorption.run_feature_absortion_experiment,
                    experiment_dir=absorption,
                    sparse_probing_experiment_dir=k_sparse,
                    probes_dir=probes,
                ),
            ),
            mock.patch.object(HookedTransformer, "from_pretrained_no_processing", lambda *args, **kwargs: model),
        ]
        for patch in patches:
            patch.start()
        os.chdir(folder)
        try:
            random.seed(random_seed)
            torch.manual_seed(random_seed)
            saebench_common.load_or_train_probe(
                model, config.prompt_template, config.prompt_token_pos, layer=layer, probes_dir=probes, device="cpu"
            )
            torch.manual_seed(random_seed)
            (folder / "results").mkdir()
            results = saebench_absorption.run_eval(config, [("fastsae", sae)], "cpu", str(folder / "results"), force_rerun=True)
            k_sparse_table = pd.DataFrame(
                json.loads((folder / "artifacts" / "absorption" / "fastsae_custom_sae_k_sparse_probing.json").read_text())
            )
        finally:
            os.chdir(previous_folder)
            for patch in patches:
                patch.stop()
    return next(iter(results.values()), {}), k_sparse_table
