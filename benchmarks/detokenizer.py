"""LaVIT detokenizer decoding speed at the tiny preset: classifier-free guidance batched (cond + uncond in one UNet
call of batch 2B) vs two separate UNet calls of batch B, in fp32 and bf16.

Times :meth:`DiffusionDecoder.sample` (all DDIM steps, the condition head and the final conversion to pixels) from
fixed reconstructed features, so the tokenizer's cost is left out (it is the same for both forms and small next to
the UNet). Weights are random: the speed does not depend on them, and both forms give the same images
(tests/test_lavit_detokenizer.py).
"""

from __future__ import annotations

import torch

from benchmarks.common import Report, Table, time_calls
from vlpretrain.configs import get_preset
from vlpretrain.lavit.detokenizer import DiffusionDecoder

NAME = "detokenizer"
BATCH, STEPS, GUIDANCE = 16, 10, 3.0


def _decode(decoder: DiffusionDecoder, feats: torch.Tensor, noise: torch.Tensor, steps: int, batched: bool,
            bf16: bool):  # fmt: skip
    """A no-argument call sampling the whole batch once."""

    def call() -> None:
        decoder.sample(feats, noise, steps, GUIDANCE, batched=batched, bf16=bf16)

    return call


def run(quick: bool = False) -> Report:
    """Median images/s of batched and two-pass guidance, per precision."""
    import vlpretrain.lavit.detokenizer_task  # noqa: F401  (registers the presets)

    batch, steps = (4, 2) if quick else (BATCH, STEPS)
    warmup, repeats = (0, 1) if quick else (1, 3)
    cfg = get_preset("lavit-detokenizer", "tiny")
    torch.manual_seed(0)
    decoder = DiffusionDecoder(cfg).eval()
    feats = torch.randn(batch, cfg.num_patches, cfg.feature_dim)
    noise = decoder.initial_noise(batch, torch.Generator().manual_seed(0))
    table = Table(
        f"tiny preset, batch {batch}, {steps} DDIM steps, guidance {GUIDANCE} (median of {repeats})",
        ["dtype", "two passes img/s", "batched img/s", "speed-up"],
    )
    for dtype in ("fp32", "bf16"):
        rates = {
            batched: batch / time_calls(_decode(decoder, feats, noise, steps, batched, dtype == "bf16"), warmup,
                                        repeats).median
            for batched in (False, True)
        }  # fmt: skip
        table.add(dtype, f"{rates[False]:,.2f}", f"{rates[True]:,.2f}", f"{rates[True] / rates[False]:.2f}x")
    notes = [
        f"64 px pixel-space diffusion (UNet {sum(p.numel() for p in decoder.unet.parameters()) / 1e6:.1f}M "
        "parameters); images/s falls as 1/steps (the default is 25 DDIM steps).",
        "Two passes: one UNet call for the conditional and one for the all-zero unconditional branch per step; "
        "batched: one call of twice the batch. Both compute the same images.",
    ]
    return Report(NAME, "LaVIT detokenizer decoding (`detokenizer`)", table, notes)
