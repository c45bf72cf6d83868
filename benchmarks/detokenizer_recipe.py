"""Detokenizer recipe experiments on cached tokenizer features (the numbers of docs/detokenizer.md, "Quality").

The frozen tokenizer's reconstructed features of the shapes-world training split are computed once and cached; the
diffusion decoder then trains in a plain loop (AdamW, warm-up + cosine, bf16 autocast, gradient clipping 1.0) and
the judge scores held-out reconstructions (agreement of count, colours and shapes with the originals).

    python -m benchmarks.detokenizer_recipe --run runs/demo --steps 400 --batch 16 --pred sample
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlpretrain.configs import apply_overrides, get_preset, merge
from vlpretrain.data.judge import attribute_match, load_judge
from vlpretrain.data.shards import read_records
from vlpretrain.lavit.detokenizer import DiffusionDecoder
from vlpretrain.lavit.detokenizer_task import TINY_SPATIAL
from vlpretrain.lavit.tokenizer_task import load_frozen_tokenizer

ATTRIBUTES = ("count", "colors", "shapes")


def cached_pairs(
    run: Path, split: str, limit: int, cache: Path, oracle: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [M, 3, S, S] in [0, 1], reconstructed features [M, N, D]) of ``split``, cached in ``cache``; with
    ``oracle`` the frozen encoder's own features instead (what a perfect tokenizer would reconstruct)."""
    file = cache / f"{split}_{limit}{'_oracle' if oracle else ''}.pt"
    if file.exists():
        return torch.load(file)
    tokenizer = load_frozen_tokenizer(str(run / "tokenizer")).eval()
    images, _ = read_records(str(run / "data" / split))
    pixels = torch.from_numpy(np.stack(images[:limit])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():

        def features(x: torch.Tensor) -> torch.Tensor:
            return tokenizer.encoder(x) if oracle else tokenizer.decode_codes(tokenizer.tokenize(x)[0])

        feats = torch.cat([features(pixels[i : i + 250]) for i in range(0, len(pixels), 250)])
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save((pixels, feats.float()), file)
    return pixels, feats.float()


def train(
    model: DiffusionDecoder, pixels: torch.Tensor, feats: torch.Tensor, steps: int, batch: int, lr: float
) -> float:
    """Train on random batches of cached pairs; returns seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        scale = min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        idx = torch.randint(len(pixels), (batch,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(pixels[idx], feats[idx]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    return time.perf_counter() - start


def _uint8(images: torch.Tensor) -> list[np.ndarray]:
    return [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in images]


def evaluate(model: DiffusionDecoder, pixels: torch.Tensor, feats: torch.Tensor, judge_dir: Path, steps: int,
             guidance: float, grid: Path) -> dict[str, float]:  # fmt: skip
    """Judge agreement between originals and DDIM reconstructions from their features; writes a sample grid."""
    model.eval()
    rec = torch.cat([
        model.sample(feats[i : i + 50], model.initial_noise(len(feats[i : i + 50]), torch.Generator().manual_seed(i)),
                     steps, guidance, bf16=True)
        for i in range(0, len(feats), 50)
    ])  # fmt: skip
    judge = load_judge(judge_dir)
    originals, redrawn = judge.read(_uint8(pixels)), judge.read(_uint8(rec))
    scores = {f"agree_{k}": float(np.mean([attribute_match(r, o)[k] for o, r in zip(originals, redrawn, strict=True)]))
              for k in ATTRIBUTES}  # fmt: skip
    scores["agree_mean"] = float(np.mean(list(scores.values())))
    rows = torch.cat([torch.cat(list(pixels[:8]), 2), torch.cat(list(rec[:8]), 2)], 1)
    Image.fromarray(_uint8(rows[None])[0]).save(grid)
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/demo", help="demo run folder (data/, tokenizer/, judge/)")
    parser.add_argument("--set", action="append", default=[], help="DetokenizerConfig override, e.g. cond_dropout=0")
    parser.add_argument("--pred", default="sample", choices=["epsilon", "sample", "v_prediction"])
    parser.add_argument("--no-spatial", action="store_true", help="cross-attention only (no spatial condition)")
    parser.add_argument("--oracle", action="store_true", help="condition on the encoder's features, not the tokens'")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval", type=int, default=100, help="held-out images to redraw")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", default="1.0", help="guidance scales to evaluate, comma-separated")
    parser.add_argument("--cache", default="runs/detokenizer_recipe")
    args = parser.parse_args(argv)
    run, cache = Path(args.run), Path(args.cache)
    base = get_preset("lavit-detokenizer", "tiny")
    spatial = 0 if args.no_spatial else TINY_SPATIAL
    cfg = merge(base, {"spatial_channels": spatial, "unet": base.unet | {"in_channels": 12 + spatial},
                       "scheduler": base.scheduler | {"prediction_type": args.pred}})  # fmt: skip
    cfg = apply_overrides(cfg, args.set)
    torch.manual_seed(0)
    model = DiffusionDecoder(cfg)
    pixels, feats = cached_pairs(run, "train", 5000, cache, args.oracle)
    test_pixels, test_feats = cached_pairs(run, "test", args.eval, cache, args.oracle)
    seconds = train(model, pixels, feats, args.steps, args.batch, args.lr)
    result = {"pred": args.pred, "spatial": spatial, "oracle": args.oracle, "overrides": args.set,
              "steps": args.steps, "batch": args.batch, "train_s": round(seconds, 1)}  # fmt: skip
    for scale in (float(g) for g in args.guidance.split(",")):
        tags = ("nospatial_" if args.no_spatial else "") + ("oracle_" if args.oracle else "")
        grid = cache / f"grid_{args.pred}_{tags}{args.steps}_g{scale:g}.png"
        scores = evaluate(model, test_pixels, test_feats, run / "judge", args.sample_steps, scale, grid)
        result[f"guidance_{scale:g}"] = scores | {"grid": str(grid)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
