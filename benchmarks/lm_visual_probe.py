"""How much of each object's shape and colour reaches a trained LaVIT LM's visual input (docs/lm.md, "Where the
colour goes").

For the kept object patches of shapes-world test images (per-patch ground truth), the held-out accuracy of a linear
probe (:func:`benchmarks.tokenizer_codes.linear_probe_accuracy`) reading shape and colour from the LM's
understanding path: the merged token (``visual.merger``, fine-tuned unless ``train_merger`` is false) and the same
token after ``visual.vit_proj``, i.e. what the LLaMA reads.

    python -m benchmarks.lm_visual_probe --lm runs/demo/lm
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor

from benchmarks.tokenizer_codes import linear_probe_accuracy
from vlpretrain.data.synthetic import COLORS, SHAPES, SynthConfig
from vlpretrain.lavit.demo_encoder import make_dense_pool
from vlpretrain.lavit.lm_task import LavitLMTask

PROBE_TRAIN_FRACTION = 0.7  # object tokens (in image order) that fit a probe; the rest score it


@torch.no_grad()
def _object_tokens(task: LavitLMTask, images_BHWC: Tensor, targets_BAN: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merged [M, D] and projected [M, H] visual tokens of the kept object patches, and their (shape, colour) [M, 2]."""
    merged, projected, labels = [], [], []
    for start in range(0, len(images_BHWC), 100):
        pixels = images_BHWC[start : start + 100].permute(0, 3, 1, 2).float().div(255).to(task.device)
        frozen = task.frozen_visual(pixels, [False] * len(pixels))
        merged_BKD, valid_BK = task.visual.merger(frozen.x_BND, frozen.keep_BN, dense=False)
        projected_BKH = task.visual.vit_proj(merged_BKD)
        t_BAN = targets_BAN[start : start + 100].long()
        for b in range(len(pixels)):
            positions = frozen.keep_BN[b].bool().nonzero().flatten().cpu()
            on_object = t_BAN[b, 0, positions] == 1
            rows = valid_BK[b].nonzero().flatten().cpu()[on_object]
            merged.append(merged_BKD[b, rows].float().cpu())
            projected.append(projected_BKH[b, rows].float().cpu())
            labels.append(t_BAN[b, 1:3, positions[on_object]].T)
    return torch.cat(merged), torch.cat(projected), torch.cat(labels)


def visual_input_probes(task: LavitLMTask, num_images: int = 800) -> dict:
    """``{"object_tokens": M, "merged": {"shape", "color"}, "projected": {"shape", "color"}}`` (accuracies) on the
    first ``num_images`` shapes-world test images at the task's image size."""
    encoder = task.tokenizer.encoder
    synth = SynthConfig(image_size=encoder.image_size)
    patch_size = encoder.image_size // round(encoder.num_patches**0.5)
    images, targets, _ = make_dense_pool(synth, "test", num_images, patch_size)
    merged, projected, labels = _object_tokens(task, images, targets)
    out: dict = {"object_tokens": len(labels)}
    if len(labels) < 10:
        return out  # too few kept object tokens to fit and score a probe
    train = torch.arange(len(labels)) < int(PROBE_TRAIN_FRACTION * len(labels))
    for name, x in (("merged", merged), ("projected", projected)):
        out[name] = {"shape": linear_probe_accuracy(x, labels[:, 0], len(SHAPES), train),
                     "color": linear_probe_accuracy(x, labels[:, 1], len(COLORS), train)}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    from vlpretrain.train.pretrained import load_task

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", required=True, help="a lavit-lm run or checkpoint folder")
    parser.add_argument("--images", type=int, default=800, help="shapes-world test images")
    args = parser.parse_args(argv)
    task, _ = load_task(args.lm, expect_task="lavit-lm")
    print(json.dumps(visual_input_probes(task.eval(), args.images), indent=1))


if __name__ == "__main__":
    main()
