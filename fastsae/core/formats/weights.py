"""Another library's SAE tensors in our layout, and the exact rewrites ("folds") that make our forward compute theirs.

Our SAE computes f = act(W_enc (x − b_dec) + b_enc) and x̂ = f W_dec + b_dec on raw activations.
Each peer differs from that in a way an affine rewrite of the weights absorbs without changing a
single feature activation or reconstruction: an encoder that reads x instead of x − b_dec, an SAE
trained on s·x, features reported as pre-activation × ‖decoder row‖. The folds run in float64 and
the SAE is built in float32, so what the peer computes in float32 comes out the same to rounding.

The peers' files are read here too, so that a damaged, truncated or incomplete one is one UserError
naming the file and how to get a whole one (`fix`: save it again, or download it again), not the
parser's traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fastsae.common.errors import UserError
from fastsae.core.sae import SAESpec, SparseAutoencoder


class SavedTensors(dict):
    """A file's tensors by name; asking for one it lacks is a UserError naming the file and `fix`, not a KeyError."""

    def __init__(self, tensors: dict[str, Any], path: Path, fix: str) -> None:
        super().__init__(tensors)
        self.path, self.fix = path, fix

    def __missing__(self, name: str) -> Any:
        held = ", ".join(sorted(self)) or "nothing"
        raise UserError(f"{self.path} has no {name!r} (it holds {held}): it is damaged or not the SAE it should be. {self.fix}")


def read_json_config(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a truncated or garbled file is a UserError saying `fix`."""
    try:
        config = json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise _damaged(path, error, fix) from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is damaged: it holds a JSON {type(config).__name__}, not a config object. {fix}")
    return config


def read_safetensors(path: Path, fix: str) -> SavedTensors:
    """The tensors of a .safetensors file, on the CPU; a truncated or garbled file is a UserError saying `fix`."""
    try:
        return SavedTensors(load_file(path), path, fix)
    except SafetensorError as error:
        raise _damaged(path, error, fix) from None


def read_torch_tensors(path: Path, fix: str) -> SavedTensors:
    """A state_dict saved with torch.save, on the CPU and without unpickling code; a damaged file is a UserError saying `fix`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise _damaged(path, error, fix) from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is damaged: it holds a {type(state).__name__}, not a state_dict. {fix}")
    return SavedTensors(state, path, fix)


def _damaged(path: Path, error: Exception, fix: str) -> UserError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
    return UserError(f"{path} is damaged or incomplete ({type(error).__name__}: {reason}). {fix}")


def _as_float64(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float64)


@dataclass(frozen=True)
class SAEWeights:
    """An SAE's tensors, float64 on the CPU: encoder and decoder rows per feature, both (M, d)."""

    W_enc: torch.Tensor  # (M, d)
    b_enc: torch.Tensor  # (M,)
    W_dec: torch.Tensor  # (M, d)
    b_dec: torch.Tensor  # (d,)
    threshold: torch.Tensor | None = None  # JumpReLU's (M,) thresholds, or BatchTopK's scalar one

    @classmethod
    def of(
        cls,
        source: str,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        threshold: torch.Tensor | None = None,
    ) -> SAEWeights:
        """The tensors as float64, checked to fit together (`source` names the file in the error)."""
        weights = cls(*(_as_float64(tensor) for tensor in (W_enc, b_enc, W_dec, b_dec)), _as_float64(threshold))
        m, d = weights.W_enc.shape
        expected = {"W_dec": (m, d), "b_enc": (m,), "b_dec": (d,)}
        wrong = {
            name: tuple(getattr(weights, name).shape) for name, shape in expected.items() if tuple(getattr(weights, name).shape) != shape
        }
        if weights.threshold is not None and weights.threshold.numel() not in (1, m):
            wrong["threshold"] = tuple(weights.threshold.shape)
        if wrong:
            raise UserError(
                f"{source}: the SAE's tensors do not fit together (encoder {m} features × d={d}; got {wrong}). The file is damaged."
            )
        return weights

    @classmethod
    def gated(
        cls,
        source: str,
        W_enc: torch.Tensor,
        r_mag: torch.Tensor,
        b_gate: torch.Tensor,
        b_mag: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
    ) -> SAEWeights:
        """A gated SAE (Rajamanoharan et al., 2024) as the JumpReLU SAE it equals. It computes 1[W x' + b_gate > 0] ·
        ReLU(e^r_mag ⊙ W x' + b_mag), and its gate opens exactly where the magnitude pre-activation exceeds b_mag −
        e^r_mag ⊙ b_gate: so the magnitude path is the encoder, and that is each feature's threshold."""
        m = W_enc.shape[0]
        wrong = {name: tuple(tensor.shape) for name, tensor in (("r_mag", r_mag), ("b_gate", b_gate)) if tuple(tensor.shape) != (m,)}
        if wrong:
            raise UserError(f"{source}: the SAE's tensors do not fit together (encoder {m} features; got {wrong}). The file is damaged.")
        scale, b_mag = _as_float64(r_mag).exp(), _as_float64(b_mag)
        return cls.of(source, _as_float64(W_enc) * scale[:, None], b_mag, W_dec, b_dec, threshold=b_mag - scale * _as_float64(b_gate))

    @property
    def m(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d(self) -> int:
        return self.W_enc.shape[1]

    def with_input_bias_folded(self) -> SAEWeights:
        """For an encoder that reads x, not x − b_dec (SAELens' apply_b_dec_to_input = False, dictionary_learning's
        JumpReLU): b_enc + W_enc b_dec, so that W_enc (x − b_dec) + b_enc' = W_enc x + b_enc."""
        return replace(self, b_enc=self.b_enc + self.W_enc @ self.b_dec)

    def with_input_scale_folded(self, scale: float) -> SAEWeights:
        """For an SAE that reads s·x and reconstructs s·x (SAELens' expected_average_only_in): W_enc·s, W_dec/s and
        b_dec/s take raw x and give raw x̂ with the same pre-activations, so b_enc and the thresholds stay."""
        return replace(self, W_enc=self.W_enc * scale, W_dec=self.W_dec / scale, b_dec=self.b_dec / scale)

    def with_decoder_norms_folded(self) -> SAEWeights:
        """For features reported as pre-activation × ‖decoder row‖ and decoded as f / ‖decoder row‖ (SAELens'
        rescale_acts_by_decoder_norm, dictionary_learning's normalize_decoder): unit decoder rows, encoder rows and
        b_enc times the norm. A threshold compared with the rescaled values (SAELens' BatchTopK) stays as it is."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-8)
        return replace(self, W_enc=self.W_enc * norms[:, None], b_enc=self.b_enc * norms, W_dec=self.W_dec / norms[:, None])

    def to_sae(self, spec: SAESpec) -> SparseAutoencoder:
        """Our SAE with these weights. A JumpReLU threshold below 0 is raised to 0: the peers mask a ReLU's output,
        so a negative threshold passes exactly the positive pre-activations, as a threshold of 0 does in ours."""
        threshold = self.threshold
        if threshold is not None and spec.architecture == "jumprelu":
            threshold = threshold.expand(spec.m).clamp_min(0)
        elif threshold is not None:
            threshold = threshold.reshape(-1)[0]
        return SparseAutoencoder.from_weights(spec, self.W_enc, self.b_enc, self.W_dec, self.b_dec, threshold)
