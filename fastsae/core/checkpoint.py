"""SAE checkpoints: HypotheSAEs' format, readable by its `load_model`, for the SAEs it runs; ours for the rest.

A checkpoint is `torch.save({"config", "state_dict", "fastsae"})`:
- `config` holds only HypotheSAEs' constructor keys, because its loader calls
  `SparseAutoencoder(**config)`. Only Top-K and BatchTopK SAEs (Matryoshka too) get it:
  HypotheSAEs would run a ReLU SAE as a Top-K one and fail on a JumpReLU one, so those
  files hold no `config` (its loader refuses them) and are read here or, from the SAELens
  export beside them, by SAELens;
- `state_dict` uses its key names (encoder.weight (M, d), decoder.weight (d, M),
  input_bias, neuron_bias, threshold);
- `fastsae` holds ours, an `SAEInfo` (fastsae/core/sae_info.py): architecture, the
  activation scale, model, hook, the store's manifest and the training settings.

Training runs on activations multiplied by a scale s; the saved weights have
s folded in (W_enc·s, W_dec/s, b_dec/s), so the checkpoint applies to raw
activations from the store, in HypotheSAEs or here, with no extra step.
Pre-activations come out the same, so b_enc and the JumpReLU and BatchTopK
thresholds, which are compared with them, are saved as trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from fastsae.common.atomic_files import write_atomically
from fastsae.common.errors import UserError
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.core.sae_info import SAEInfo

HYPOTHESAES_DEAD_AFTER_STEPS = 256  # its constructor's default, for an SAE that was not trained here
HYPOTHESAES_STATE_KEYS = {"encoder.weight", "decoder.weight", "input_bias", "neuron_bias", "threshold"}


class LoadedSAE(NamedTuple):
    sae: SparseAutoencoder  # applies to raw (unscaled) activations
    info: SAEInfo  # our `fastsae` block, typed; for a HypotheSAEs checkpoint, its shape only


def hypothesaes_config(spec: SAESpec, dead_after_steps: int) -> dict[str, Any]:
    return {
        "input_dim": spec.d,
        "m_total_neurons": spec.m,
        "k_active_neurons": spec.k,
        "aux_k": spec.aux_k or None,
        "multi_k": None,
        "dead_neuron_threshold_steps": dead_after_steps,
        "prefix_lengths": list(spec.prefixes) or None,
        "use_batch_topk": spec.architecture == "batchtopk",
    }


@torch.no_grad()
def raw_space_state(sae: SparseAutoencoder, scale: float) -> dict[str, torch.Tensor]:
    """HypotheSAEs-named weights with the activation scale folded in, on the CPU in float32."""
    state = {
        "encoder.weight": sae.W_enc.float() * scale,
        "decoder.weight": (sae.W_dec.float() / scale).T.contiguous(),
        "input_bias": sae.b_dec.float() / scale,
        "neuron_bias": sae.b_enc.float(),
        "threshold": sae.jumprelu_threshold.float() if sae.spec.architecture == "jumprelu" else sae.threshold.float(),
    }
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


def save_checkpoint(path: Path, sae: SparseAutoencoder, dead_after_steps: int, info: SAEInfo) -> Path:
    """Write atomically (temp file, then rename): a crash never leaves a half checkpoint."""
    payload = {"state_dict": raw_space_state(sae, info.activation_scale), "fastsae": info.to_dict()}
    if sae.spec.runs_in_hypothesaes:  # only then: its loader would read a ReLU or JumpReLU SAE as a Top-K one
        payload["config"] = hypothesaes_config(sae.spec, dead_after_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda partial: torch.save(payload, partial))


def load_sae(path: str | Path, device: str = "cpu") -> LoadedSAE:
    """Open one of our checkpoints or a HypotheSAEs one; the SAE it returns works on raw activations."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}. Train one with train_sae.py or check the path.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__}: {str(error).splitlines()[0]}).") from None
    described = isinstance(payload, dict) and ("config" in payload or "fastsae" in payload)
    if not described or not HYPOTHESAES_STATE_KEYS <= set(payload.get("state_dict", {})):
        raise UserError(
            f"{path} is not a fastsae or HypotheSAEs SAE checkpoint (it needs 'fastsae' or 'config', and a state_dict with {sorted(HYPOTHESAES_STATE_KEYS)})."
        )
    block = payload.get("fastsae")
    info = SAEInfo.from_dict(block) if block else SAEInfo.from_hypothesaes_config(payload["config"])
    state = payload["state_dict"]
    sae = SparseAutoencoder.from_weights(
        info.spec,
        W_enc=state["encoder.weight"],
        b_enc=state["neuron_bias"],
        W_dec=state["decoder.weight"].T,
        b_dec=state["input_bias"],
        threshold=state["threshold"],
    )
    return LoadedSAE(sae.to(device), info)
