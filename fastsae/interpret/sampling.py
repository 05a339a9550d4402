"""Which activating windows the explainer and the scorers see: delphi's quantile sampling.

A feature's activating windows, strongest first, are cut into N_QUANTILES groups of equal size
(delphi's `split_quantiles`: quantile 0 is the strongest tenth; the few weakest windows that the
integer division leaves over belong to none). The explainer gets EXPLAIN_EXAMPLES / N_QUANTILES at
random from each quantile, or the EXPLAIN_EXAMPLES strongest windows (delphi's `train_type="top"`);
the scorers get SCORE_EXAMPLES / N_QUANTILES from each quantile, drawn from the windows the
explainer did not see. delphi divides with `//` and says nothing of what is left over; InterpretConfig
refuses counts that are not multiples of N_QUANTILES, so every count means what its name says. delphi 0.1.3 draws its explainer's and its scorers' windows independently,
both with seed 22, so the two sets overlap there; here no scored window was ever shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastsae.interpret.windows import FeatureWindows


@dataclass
class WindowSample:
    """A feature's windows for the LLM, each named by the store token of its maximum."""

    explain: np.ndarray  # shown to the explainer
    score: np.ndarray  # held out for the scorers, never among `explain`
    score_quantiles: np.ndarray  # quantile of each scored window (0 = the strongest)


def quantile_of_each(count: int, n_quantiles: int) -> np.ndarray:
    """Quantile of each of `count` windows ordered strongest first (0 = the strongest); -1 for the leftover weakest."""
    size = count // n_quantiles
    quantiles = np.full(count, -1)
    if size:
        quantiles[: size * n_quantiles] = np.arange(size * n_quantiles) // size
    return quantiles


def sample_windows(
    windows: FeatureWindows, explain_count: int, score_count: int, n_quantiles: int, explain_from_top: bool, rng: np.random.Generator
) -> WindowSample:
    """The explainer's and the scorers' windows for one feature (see the module docstring); `windows.values` is strongest first."""
    quantiles = quantile_of_each(len(windows.values), n_quantiles)
    explain_each, score_each = explain_count // n_quantiles, score_count // n_quantiles
    shown, scored, scored_quantiles = [], [], []
    top = windows.top_peaks[:explain_count] if explain_from_top else np.zeros(0, dtype=np.int64)
    for quantile in range(n_quantiles):
        members = rng.permutation(windows.peaks[quantiles == quantile])
        if not explain_from_top:
            shown.append(members[:explain_each])
            members = members[explain_each:]
        members = members[~np.isin(members, top)][:score_each]
        scored.append(members)
        scored_quantiles.append(np.full(len(members), quantile))
    explain = top if explain_from_top else np.concatenate(shown)
    return WindowSample(explain, np.concatenate(scored), np.concatenate(scored_quantiles))
