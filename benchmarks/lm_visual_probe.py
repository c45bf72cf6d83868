"""How much of each object's shape and colour reaches a trained LaVIT LM's visual input (docs/lm.md, "Where the
colour goes").

For the kept object patches of shapes-world test images (per-patch ground truth), the held-out accuracy of a linear
probe (:func:`benchmarks.tokenizer_codes.linear_probe_accuracy`) reading shape and colour from the LM's
understanding path: the merged token (``visual.merger``, fine-tuned unless ``train_merger`` is false) and the same
token after ``visual.project`` (the whitening, if any, and ``vit_proj``), i.e. what the LLaMA reads.

    python -m benchmarks.lm_visual_probe --lm runs/demo/lm
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor

from benchmarks.tokenizer_codes import dense_pool_at, kept_object_rows, probe_stages, unit_pixels
from vlpretrain.data.synthetic import COLORS, SHAPES
from vlpretrain.lavit.lm_task import LavitLMTask


@torch.no_grad()
def _object_tokens(task: LavitLMTask, images_BHWC: Tensor, targets_BAN: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Merged [M, D] and projected [M, H] visual tokens of the kept object patches ({"merged", "projected"}), and
    their (shape, colour) [M, 2]."""
    merged, projected, labels = [], [], []
    for start in range(0, len(images_BHWC), 100):
        pixels = unit_pixels(images_BHWC[start : start + 100], task.device)
        frozen = task.frozen_visual(pixels, [False] * len(pixels))
        merged_BKD, valid_BK = task.visual.merger(frozen.x_BND, frozen.keep_BN, dense=False)
        projected_BKH = task.visual.project(merged_BKD, valid_BK)
        t_BAN = targets_BAN[start : start + 100].long().to(frozen.keep_BN.device)
        for b in range(len(pixels)):
            rows, positions = kept_object_rows(frozen.keep_BN[b], valid_BK[b], t_BAN[b, 0])
            merged.append(merged_BKD[b, rows].float().cpu())
            projected.append(projected_BKH[b, rows].float().cpu())
            labels.append(t_BAN[b, 1:3, positions].T.cpu())
    return {"merged": torch.cat(merged), "projected": torch.cat(projected)}, torch.cat(labels)


def visual_input_probes(task: LavitLMTask, num_images: int = 800) -> dict:
    """``{"object_tokens": M, "merged": {"shape", "color"}, "projected": {"shape", "color"}}`` (accuracies) on the
    first ``num_images`` shapes-world test images at the task's image size."""
    encoder = task.tokenizer.encoder
    images, targets = dense_pool_at(encoder.image_size, encoder.num_patches, num_images)
    vectors, labels = _object_tokens(task, images, targets)
    return probe_stages(vectors, labels, {"shape": len(SHAPES), "color": len(COLORS)})


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
