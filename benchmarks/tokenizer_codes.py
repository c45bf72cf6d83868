"""What a trained LaVIT tokenizer's codes carry (the diagnostics of docs/lavit.md, "What the codes carry" and "Which
attributes the codes keep").

- ``code_information``: held-out reconstruction cosine with each image's real codes, with the codes shuffled within
  the image, with one fixed id everywhere and with random ids (keep masks, so token counts and ranks, unchanged),
  and the cosine of each image's mean feature (a baseline that needs no tokens).
- ``attribute_entropies``: on shapes-world test images with per-patch ground truth, the fraction of object and
  background patches kept, how often each patch position is kept (and how many positions are kept in at least 90 %
  of the images: a selector that keeps the same positions whatever the image shows) and, over the kept tokens on
  object patches, the entropy (bits) of shape, colour, size and grid position and their conditional entropy given
  the code id (biased low when codes are many per token).
- ``feature_variance``: the share of the encoder features' variance explained by each patch attribute.
- ``stage_probes``: where an attribute is lost on the way from feature to code: held-out accuracy of a linear probe
  (multinomial logistic regression) reading shape, colour, size and grid position of the kept object tokens from the
  encoder feature, the merged token, the unit vector ``z`` the quantizer sees and the code vector it picks.

    python -m benchmarks.tokenizer_codes --tokenizer runs/demo/tokenizer --data runs/demo/data/test
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vlpretrain.data.synthetic import COLORS, SHAPES, SIZES, SynthConfig
from vlpretrain.lavit.api import Tokenizer
from vlpretrain.lavit.demo_encoder import make_dense_pool

ATTRIBUTES = ("shape", "color", "size")  # rows 1..3 of the patch targets (row 0: objectness)
VARIANCE_IMAGES = 500  # test images of the feature-variance shares


@torch.no_grad()
def code_information(tokenizer: Tokenizer, images: Sequence[Any], batch_size: int = 100, seed: int = 0) -> dict:
    """Mean held-out cosine (over all patches) of the reconstructions from real and replaced codes."""
    model, generator = tokenizer.model, torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    patches = 0
    for start in range(0, len(images), batch_size):
        x_BND = model.encoder(tokenizer.preprocess(images[start : start + batch_size]))
        ids, _ = model.tokenize_features(x_BND).ids_and_keep()
        x_BND = x_BND.float()
        if not any(len(i) for i in ids):
            last = start + len(ids) - 1
            raise SystemExit(f"error: the tokenizer keeps no patch of test images {start}..{last}: nothing to "
                             "measure (a collapsed selector; see its eval_tokenizer.json keep_ratio)")  # fmt: skip
        common = int(torch.cat(ids).mode().values)
        variants = {
            "real": ids,
            "shuffled_within_image": [i[torch.randperm(len(i), generator=generator)] for i in ids],
            "one_fixed_id": [torch.full_like(i, common) for i in ids],
            "random_ids": [torch.randint(0, model.cfg.codebook_size, i.shape, generator=generator) for i in ids],
        }
        for name, variant in variants.items():
            cos = F.cosine_similarity(model.decode_codes(variant).float(), x_BND, dim=-1)
            sums[name] = sums.get(name, 0.0) + float(cos.sum())
        mean_BND = x_BND.mean(dim=1, keepdim=True).expand_as(x_BND)
        sums["image_mean_baseline"] = sums.get("image_mean_baseline", 0.0) + float(
            F.cosine_similarity(mean_BND, x_BND, dim=-1).sum()
        )
        patches += x_BND.shape[0] * x_BND.shape[1]
    return {name: total / patches for name, total in sums.items()}


def dense_pool_at(image_size: int, num_patches: int, num_images: int) -> tuple[Tensor, Tensor]:
    """The first ``num_images`` shapes-world test images (uint8 [B, H, W, 3]) at ``image_size`` and their patch
    targets (int8 [B, A, N], row 0 objectness, rows 1-3 shape, colour, size) on a grid of ``num_patches``."""
    patch_size = image_size // round(num_patches**0.5)
    images, targets, _ = make_dense_pool(SynthConfig(image_size=image_size), "test", num_images, patch_size)
    return images, targets


def dense_test_pool(tokenizer: Tokenizer, num_images: int) -> tuple[Tensor, Tensor]:
    """:func:`dense_pool_at` the tokenizer's image and patch size."""
    return dense_pool_at(tokenizer.image_size, tokenizer.model.num_patches, num_images)


def kept_object_rows(keep_N: Tensor, valid_K: Tensor, objectness_N: Tensor) -> tuple[Tensor, Tensor]:
    """For one image: the rows of its padded kept-token sequence (valid mask [K]) that lie on object patches, and
    those patches' grid indices (both long [M]), given its keep mask [N] (bool) and objectness [N] (1 = object).
    Kept tokens are in raster order, so the i-th valid row is the i-th kept patch."""
    positions = keep_N.bool().nonzero().flatten()
    on_object = objectness_N[positions] == 1
    return valid_K.nonzero().flatten()[on_object], positions[on_object]


def probe_stages(vectors: dict[str, Tensor], labels_MA: Tensor, classes: dict[str, int]) -> dict:
    """Held-out :func:`linear_probe_accuracy` of every attribute (column ``a`` of ``labels_MA`` [M, A] for the a-th
    name of ``classes``, which gives its class count) at every stage of ``vectors`` ({stage: [M, *]}), fitted on the
    first :data:`PROBE_TRAIN_FRACTION` of the rows: ``{"object_tokens": M, stage: {name: accuracy}}``."""
    out: dict[str, Any] = {"object_tokens": len(labels_MA)}
    if len(labels_MA) < 10:
        return out  # too few kept object tokens to fit and score a probe
    train_M = torch.arange(len(labels_MA)) < int(PROBE_TRAIN_FRACTION * len(labels_MA))
    for stage, x_MD in vectors.items():
        out[stage] = {name: linear_probe_accuracy(x_MD, labels_MA[:, a], k, train_M)
                      for a, (name, k) in enumerate(classes.items())}  # fmt: skip
    return out


def unit_pixels(images_BHWC: Tensor, device: torch.device) -> Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1] on ``device`` (the tokenizer's encoder normalises)."""
    return images_BHWC.permute(0, 3, 1, 2).float().div(255).to(device)


def _entropy(columns: np.ndarray) -> float:
    """Entropy in bits of the rows of ``columns`` [M] or [M, k] (each distinct row one outcome)."""
    _, counts = np.unique(columns, return_counts=True, axis=0)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _conditional_entropy(y: np.ndarray, x: np.ndarray) -> float:
    """H(y | x) = H(x, y) - H(x), in bits."""
    return _entropy(np.stack([x, y], axis=1)) - _entropy(x)


@torch.no_grad()
def attribute_entropies(tokenizer: Tokenizer, images_BHWC: Tensor, targets_BAN: Tensor) -> dict:
    """Keep fractions and per-attribute entropies of the kept object tokens (see the module docstring) on a
    :func:`dense_test_pool`."""
    model = tokenizer.model
    rows, kept, total = [], np.zeros(2), np.zeros(2)  # [background, object]
    kept_by_position = np.zeros(model.num_patches)
    for start in range(0, len(images_BHWC), 100):
        ids, keep_BN = model.tokenize(unit_pixels(images_BHWC[start : start + 100], tokenizer.device))
        kept_by_position += keep_BN.float().sum(dim=0).cpu().numpy()
        t_BAN = targets_BAN[start : start + 100].long()
        for b, codes in enumerate(ids):
            obj_N, keep_N = t_BAN[b, 0] == 1, keep_BN[b].cpu()
            for is_obj in (0, 1):
                mask = obj_N if is_obj else ~obj_N
                kept[is_obj] += int((keep_N & mask).sum())
                total[is_obj] += int(mask.sum())
            positions = keep_N.nonzero().flatten()
            rows += [(c, int(obj_N[p]), *(int(t_BAN[b, a, p]) for a in (1, 2, 3)), int(p))
                     for c, p in zip(codes.tolist(), positions.tolist(), strict=True)]  # fmt: skip
    table = np.array(rows)
    on_objects = table[table[:, 1] == 1]
    out: dict[str, float] = {"kept_object_fraction": kept[1] / max(total[1], 1),
                             "kept_background_fraction": kept[0] / max(total[0], 1),
                             "object_tokens": float(len(on_objects))}  # fmt: skip
    position_fraction = kept_by_position / max(len(images_BHWC), 1)
    out["positions_kept_in_90_percent"] = float((position_fraction >= 0.9).sum())
    out["kept_fraction_by_position"] = [round(float(f), 3) for f in position_fraction]
    for column, name in enumerate((*ATTRIBUTES, "position"), start=2):
        out[f"{name}_bits"] = _entropy(on_objects[:, column])
        out[f"{name}_bits_given_code"] = _conditional_entropy(on_objects[:, column], on_objects[:, 0])
    return out


def _between_share(x_MD: Tensor, labels_M: Tensor) -> float:
    """Between-class sum of squares over the total sum of squares of the rows of ``x_MD``."""
    centre_D = x_MD.mean(dim=0)
    total = ((x_MD - centre_D) ** 2).sum()
    between = sum(((x_MD[labels_M == c].mean(dim=0) - centre_D) ** 2).sum() * (labels_M == c).sum()
                  for c in labels_M.unique())  # fmt: skip
    return float(between / total)


@torch.no_grad()
def feature_variance(tokenizer: Tokenizer, images_BHWC: Tensor, targets_BAN: Tensor) -> dict:
    """Shares of the frozen encoder's feature variance explained by position and objectness (all patches) and by
    shape, colour, size and position (object patches), and the mean vector's share of the squared norm, on a
    :func:`dense_test_pool`."""
    encoder = tokenizer.model.encoder
    x_BND = torch.cat([encoder(unit_pixels(images_BHWC[s : s + 100], tokenizer.device)).float().cpu()
                       for s in range(0, len(images_BHWC), 100)])  # fmt: skip
    batch, n, dim = x_BND.shape
    x_MD, t_BAN = x_BND.reshape(-1, dim), targets_BAN.long()
    position_M, object_M = torch.arange(n).repeat(batch), t_BAN[:, 0].reshape(-1) == 1
    out = {"mean_vector_share": float((x_MD.mean(dim=0) ** 2).sum() / (x_MD**2).sum(dim=1).mean()),
           "position_all": _between_share(x_MD, position_M),
           "objectness_all": _between_share(x_MD, object_M.long())}  # fmt: skip
    for row, name in enumerate(ATTRIBUTES, start=1):
        out[f"{name}_objects"] = _between_share(x_MD[object_M], t_BAN[:, row].reshape(-1)[object_M])
    out["position_objects"] = _between_share(x_MD[object_M], position_M[object_M])
    return out


STAGES = ("feature", "merged", "z", "code")  # see stage_probes
PROBE_TRAIN_FRACTION = 0.7  # tokens (in image order) that fit a probe; the rest score it


def linear_probe_accuracy(x_MD: Tensor, labels_M: Tensor, num_classes: int, train_M: Tensor) -> float:
    """Held-out accuracy of a multinomial logistic regression (L-BFGS, small L2) from rows of ``x_MD`` [M, D] to
    ``labels_M`` [M] (long in [0, num_classes)), fitted on the rows where ``train_M`` [M] (bool) is True, scored on
    the others. The features are centred and divided by ONE scale, their root-mean-square norm over the fitting
    rows: a per-dimension standardisation would blow up residual directions too small to matter downstream (a ``z``
    sitting on its code within 1e-3 then "carries" what the code does not)."""
    x_MD = x_MD.float() - x_MD[train_M].float().mean(dim=0)
    x_MD = x_MD / (x_MD[train_M].square().sum(dim=1).mean().sqrt() + 1e-6)
    weight_DK = torch.zeros(x_MD.shape[1], num_classes, requires_grad=True)
    bias_K = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight_DK, bias_K], max_iter=200)

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = x_MD[train_M] @ weight_DK + bias_K
        loss = F.cross_entropy(logits, labels_M[train_M]) + 1e-3 * weight_DK.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted_M = (x_MD[~train_M] @ weight_DK + bias_K).argmax(dim=-1)
    return float((predicted_M == labels_M[~train_M]).float().mean())


@torch.no_grad()
def _stage_rows(tokenizer: Tokenizer, images_BHWC: Tensor, targets_BAN: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """For every kept object token: its vector at each of :data:`STAGES` ({stage: [M, *]}) and its labels [M, 4]
    (shape, colour, size, grid position)."""
    model = tokenizer.model
    rows: dict[str, list[Tensor]] = {stage: [] for stage in STAGES}
    labels = []
    for start in range(0, len(images_BHWC), 100):
        x_BND = model.encoder(unit_pixels(images_BHWC[start : start + 100], tokenizer.device))
        out = model.tokenize_features(x_BND)
        keep_BN, merged_BKD, valid_BK, z_BKC = out.keep_BN, out.merged_BKD, out.valid_BK, out.z_BKC
        code_BKC = model.quantize.indices_to_codes(out.ids_BK)
        t_BAN = targets_BAN[start : start + 100].long().to(keep_BN.device)
        for b in range(len(x_BND)):
            k, p = kept_object_rows(keep_BN[b], valid_BK[b], t_BAN[b, 0])
            rows["feature"].append(x_BND[b, p].float().cpu())
            rows["merged"].append(merged_BKD[b, k].float().cpu())
            rows["z"].append(F.normalize(z_BKC[b, k].float(), dim=-1).cpu())
            rows["code"].append(code_BKC[b, k].float().cpu())
            labels.append(torch.cat([t_BAN[b, 1:4, p].T, p[:, None]], dim=1).cpu())
    return {stage: torch.cat(vectors) for stage, vectors in rows.items()}, torch.cat(labels)


def stage_probes(tokenizer: Tokenizer, images_BHWC: Tensor, targets_BAN: Tensor) -> dict:
    """Linear-probe accuracy of each attribute at each stage (see the module docstring) on a :func:`dense_test_pool`:
    ``{stage: {"shape": acc, "color": acc, "size": acc, "position": acc}}`` and ``object_tokens``."""
    vectors, labels_MA = _stage_rows(tokenizer, images_BHWC, targets_BAN)
    classes = {"shape": len(SHAPES), "color": len(COLORS), "size": len(SIZES), "position": tokenizer.model.num_patches}
    return probe_stages(vectors, labels_MA, classes)


def main(argv: list[str] | None = None) -> None:
    from vlpretrain.data.shards import read_records

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a lavit-tokenizer folder")
    parser.add_argument("--data", required=True, help="held-out shards (e.g. runs/demo/data/test)")
    parser.add_argument(
        "--images", type=int, default=1000, help="test images for the attribute entropies and the stage probes"
    )
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    images, _ = read_records(args.data, limit=500)
    pool_BHWC, targets_BAN = dense_test_pool(tokenizer, max(args.images, VARIANCE_IMAGES))  # generated once
    entropy_pool = (pool_BHWC[: args.images], targets_BAN[: args.images])
    variance_pool = (pool_BHWC[:VARIANCE_IMAGES], targets_BAN[:VARIANCE_IMAGES])
    report = {"code_information": code_information(tokenizer, images),
              "attribute_entropies": attribute_entropies(tokenizer, *entropy_pool),
              "feature_variance": feature_variance(tokenizer, *variance_pool),
              "stage_probes": stage_probes(tokenizer, *entropy_pool)}  # fmt: skip
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
