"""Tokenizer recipe ablations on cached encoder features (the numbers of docs/lavit.md, "Measured").

The frozen encoder's features of a shapes-world split are computed once and cached; the trainable parts of the
tokenizer then train in a plain loop (AdamW, warm-up + cosine, bf16 autocast, gradient clipping 1.0), which is far
faster than re-running the encoder every step and isolates the recipe. Held-out statistics use the calibrated
deterministic keep decisions and official sampling.

    python -m benchmarks.tokenizer_ablation --encoder runs/demo/encoder/vit.safetensors --data runs/demo/data \\
        --set ratio_per_image=false --steps 600
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from vlpretrain.configs import apply_overrides, get_preset, merge
from vlpretrain.data.shards import read_records
from vlpretrain.lavit.tokenizer import DynamicTokenizer, count_statistics


def cached_features(model: DynamicTokenizer, split_dir: Path, cache: Path) -> tuple[torch.Tensor, list[int]]:
    """Encoder features [M, N, D] of every image in ``split_dir`` and the object counts, cached in ``cache``."""
    if cache.exists():
        return torch.load(cache)
    images, records = read_records(str(split_dir))
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
    with torch.no_grad():
        feats = torch.cat([model.encoder(pixels[i : i + 256]) for i in range(0, len(pixels), 256)])
    out = (feats, [len(r["objects"]) for r in records])
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def train(model: DynamicTokenizer, feats: torch.Tensor, steps: int, batch: int, lr: float) -> float:
    """Train the trainable parts on random batches of cached features; returns seconds."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        scale = min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_features(feats[torch.randint(len(feats), (batch,), generator=gen)])
        opt.zero_grad()
        out.loss_B.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: rec_cos {float(out.rec_cos):.3f} keep {float(out.keep_ratio):.3f}", flush=True)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model: DynamicTokenizer, feats: torch.Tensor, objects: list[int], mode: str) -> dict[str, float]:
    """Held-out token statistics and reconstruction cosine with keep decisions ``mode``."""
    model.eval()
    model.cfg.eval_keep = mode  # type: ignore[assignment]
    ids, cos_sum = [], 0.0
    for i in range(0, len(feats), 250):
        x = feats[i : i + 250]
        merged, valid = model.causal_encoder(x, model.keep_mask(x), dense=False)
        codes = model.quantize.encode(model.encode_task_layer(merged))
        batch_ids = [codes[b, valid[b]] for b in range(len(codes))]
        rec = model.decoder(model.quantize.indices_to_codes(codes), valid)
        cos_sum += float(F.cosine_similarity(rec.float(), x, dim=-1).sum())
        ids += batch_ids
    stats = count_statistics(ids, model.cfg.codebook_size)
    tokens = np.array([len(s) for s in ids])
    stats["keep_ratio"] = float(tokens.mean() / model.num_patches)
    stats["rec_cos"] = cos_sum / feats.shape[0] / feats.shape[1]
    stats["spearman_objects_tokens"] = float(spearmanr(objects, tokens).statistic) if tokens.std() > 0 else 0.0
    return stats


def foreground_masks(data: Path, split: str, count: int, num_patches: int) -> tuple[torch.Tensor, list[str]]:
    """Foreground patches [M, N] (bool, an object paints >= a quarter of the patch) and background kinds of the first
    ``count`` images of ``split``, regenerated from the folder's recorded shapes-world config."""
    from vlpretrain.configs import from_dict
    from vlpretrain.data.synthetic import SynthConfig
    from vlpretrain.lavit.demo_encoder import make_dense_example, patch_targets

    synth = from_dict(SynthConfig, json.loads((data / "stats.json").read_text())["config"])
    patch_size = synth.image_size // math.isqrt(num_patches)
    masks, kinds = [], []
    for i in range(count):
        _, object_ids, scene = make_dense_example(synth, split, i)
        masks.append(patch_targets(scene, object_ids, patch_size)[0] == 1)
        kinds.append(scene.background["kind"])
    return torch.stack(masks), kinds


@torch.no_grad()
def foreground_stats(model: DynamicTokenizer, feats: torch.Tensor, fg: torch.Tensor, kinds: list[str]) -> dict:
    """Deterministic keep share and reconstruction cosine on object vs background patches, and cosine per
    background kind: where the tokens go."""
    model.eval()
    model.cfg.eval_keep = "deterministic"  # type: ignore[assignment]
    keep = model.keep_mask(feats)
    merged, valid = model.causal_encoder(feats, keep, dense=False)
    rec = model.decoder(model.quantize.indices_to_codes(model.quantize.encode(model.encode_task_layer(merged))), valid)
    cos = F.cosine_similarity(rec.float(), feats, dim=-1)
    out = {
        "fg_fraction": float(fg.float().mean()),
        "keep_fg": float(keep[fg].mean()),
        "keep_bg": float(keep[~fg].mean()),
        "cos_fg": float(cos[fg].mean()),
        "cos_bg": float(cos[~fg].mean()),
    }
    for kind in sorted(set(kinds)):
        rows = torch.tensor([k == kind for k in kinds])
        out[f"cos_{kind}"], out[f"keep_{kind}"] = float(cos[rows].mean()), float(keep[rows].mean())
    return {k: round(v, 4) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", required=True, help="the demo encoder's vit.safetensors")
    parser.add_argument("--data", required=True, help="shapes-world folder with train/ and test/")
    parser.add_argument("--set", action="append", default=[], help="TokenizerConfig override, e.g. rho=0.5")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--cache", default="runs/tokenizer_ablation")
    args = parser.parse_args(argv)
    import vlpretrain.lavit.tokenizer_task  # noqa: F401  (registers the presets)

    encoder = {"kind": "eva", "preset": "tiny", "path": args.encoder}
    cfg = merge(get_preset("lavit-tokenizer", "tiny"), {"encoder": encoder})
    torch.manual_seed(0)
    model = DynamicTokenizer(apply_overrides(cfg, args.set))
    stat = Path(args.encoder).stat()
    cache = Path(args.cache) / f"{stat.st_size}-{int(stat.st_mtime)}"  # a retrained encoder gets a fresh cache
    train_x, _ = cached_features(model, Path(args.data) / "train", cache / "train.pt")
    test_x, objects = cached_features(model, Path(args.data) / "test", cache / "test.pt")
    seconds = train(model, train_x, args.steps, args.batch, args.lr)
    result = {"overrides": args.set, "steps": args.steps, "train_s": round(seconds, 1)}
    result |= {mode: evaluate(model, test_x, objects, mode) for mode in ("deterministic", "sample")}
    fg, kinds = foreground_masks(Path(args.data), "test", len(test_x), model.num_patches)
    result["where"] = foreground_stats(model, test_x, fg, kinds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
