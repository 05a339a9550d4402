"""The peers' training code as the benchmarks drive it: sparsify's Trainer step and HypotheSAEs' module.

Shared by bench_train.py (CPU) and bench_gpu.py (GPU), so both run the peers the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import torch

SEED = 0


def quiet():
    """Send the peers' prints (import banners, progress bars) to stderr: stdout is for the table."""
    return contextlib.redirect_stdout(sys.stderr)


def hypothesaes_module(path: str = ""):
    """HypotheSAEs' sae.py, loaded alone (its package __init__ imports heavy packages); `path` overrides the installed one."""
    if not path:
        path = str(importlib.util.find_spec("hypothesaes").submodule_search_locations[0]) + "/sae.py"
    spec = importlib.util.spec_from_file_location("hypothesaes_sae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SparsifyTrainer:
    """sparsify's SparseCoder, stepped exactly as `sparsify.Trainer`'s fvu hook and step do.

    Its Trainer only trains on hooks of a model it runs itself, so this replays its per-step logic on given batches:
    b_dec = the first batch's mean, the decoder renormalised before each forward, loss = fvu + auxk_alpha * auxk
    (the dead mask only when auxk_alpha > 0), the gradient parallel to the decoder rows removed, and its default
    optimiser (signum: ScheduleFreeWrapper(SignSGD, momentum 0.95) at lr 5e-3 / sqrt(M / 2^14)). On a GPU its forward
    runs under its own bfloat16 autocast and its Triton sparse decoder, as in `Trainer.fit`.
    """

    def __init__(self, d: int, m: int, k: int, device: str) -> None:
        with quiet():
            from schedulefree import ScheduleFreeWrapper
            from sparsify import SparseCoder, SparseCoderConfig
            from sparsify.config import TrainConfig as SparsifyConfig
            from sparsify.sign_sgd import SignSGD
        self.cfg = SparsifyConfig(SparseCoderConfig(num_latents=m, k=k))  # defaults: signum, auxk_alpha 0
        torch.manual_seed(SEED)
        self.sae = SparseCoder(d, self.cfg.sae, device, dtype=torch.float32)
        self.learning_rate = self.cfg.lr or 5e-3 / (self.sae.num_latents / 2**14) ** 0.5  # its default for "signum"
        self.optimizer = ScheduleFreeWrapper(SignSGD([dict(params=self.sae.parameters(), lr=self.learning_rate)]), momentum=0.95)
        self.optimizer.train()
        self.since_fired = torch.zeros(m, dtype=torch.long, device=device)
        self.did_fire = torch.zeros(m, dtype=torch.bool, device=device)
        self.steps = 0

    def step(self, x: torch.Tensor) -> None:
        if self.steps == 0:
            self.sae.b_dec.data = x.float().mean(0)  # centre the pre-activations at initialisation
        self.sae.set_decoder_norm_to_unit_norm()
        dead_mask = self.since_fired > self.cfg.dead_feature_threshold if self.cfg.auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = self.sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        self.did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + self.cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            self.since_fired += len(x)
            self.since_fired[self.did_fire] = 0
            self.did_fire.zero_()
        self.steps += 1

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, fired mask) with the averaged weights its checkpoints hold (schedule-free's eval mode)."""
        self.optimizer.eval()
        top_acts, top_indices, _ = self.sae.encode(x)
        mask = torch.zeros(len(x), self.sae.num_latents, dtype=torch.bool, device=x.device).scatter_(1, top_indices, top_acts > 0)
        return self.sae.decode(top_acts, top_indices), mask
