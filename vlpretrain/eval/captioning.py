"""Caption metrics of the COCO caption evaluation: BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap).

Candidates and references go through pycocoevalcap's Stanford PTB tokenizer (Java) exactly as the official COCO
evaluation does: lower case, PTB tokens, punctuation tokens dropped. Then BLEU (corpus level, closest reference
length), METEOR 1.5 (Java), ROUGE-L (F with beta 1.2) and CIDEr-D (document frequencies from the references of the
evaluated images, scaled by 10) are computed over the images that have a prediction.

SPICE is not computed: it needs the Stanford CoreNLP models, which pycocoevalcap downloads on first use, and this
project runs offline. Published tables that list SPICE cannot be compared on that column.

References come in two public formats (:func:`load_references`):

- ``coco``: ``{"images": [...], "annotations": [{"image_id", "caption"}, ...]}`` (``captions_val2014.json``,
  the Karpathy-test files of LAVIS/BLIP, NoCaps' ``nocaps_val_4500_captions.json``);
- ``karpathy``: ``{"images": [{"filename", "split", "sentences": [{"raw"}, ...], "cocoid" | "imgid"}, ...]}``
  (``dataset_coco.json``, ``dataset_flickr30k.json``); one split is read (``test`` by default) and an image's id is
  its ``cocoid`` when present, else its ``imgid``.

Predictions are the official results format ``[{"image_id", "caption"}, ...]`` or a mapping id -> caption. Ids are
matched as strings, so ``391895`` and ``"391895"`` are the same image. The result is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from vlpretrain.errors import UserError
from vlpretrain.eval.files import field, json_list, read_json

CaptionFormat = Literal["auto", "coco", "karpathy"]
METRICS = ("bleu", "meteor", "rouge", "cider")
SPICE_NOTE = "SPICE is not computed: it needs Stanford CoreNLP models that pycocoevalcap downloads (offline here)."


def load_references(path: str | Path, format: CaptionFormat = "auto", split: str = "test") -> dict[str, list[str]]:
    """Reference captions per image id (as a string) from a ``coco`` or ``karpathy`` file (``auto``: by shape).

    Raises:
        UserError: the file is missing, not JSON, lacks a field, or holds no caption (for ``karpathy``: in ``split``).
    """
    data = read_json(path)
    source = str(path)
    if format == "auto":
        format = "coco" if isinstance(data, dict) and "annotations" in data else "karpathy"
    refs: dict[str, list[str]] = {}
    if format == "coco":
        for i, ann in enumerate(json_list(data, source, "annotations")):
            where = f"annotations[{i}]"
            image_id = field(ann, "image_id", source, where, (int, str))
            refs.setdefault(str(image_id), []).append(field(ann, "caption", source, where, str))
    elif format == "karpathy":
        for i, image in enumerate(json_list(data, source, "images")):
            where = f"images[{i}]"
            if field(image, "split", source, where, str) != split:
                continue
            key = "cocoid" if isinstance(image, dict) and "cocoid" in image else "imgid"
            image_id = str(field(image, key, source, where, (int, str)))
            sentences = field(image, "sentences", source, where, list)
            refs[image_id] = [field(s, "raw", source, f"{where}.sentences[{j}]", str) for j, s in enumerate(sentences)]
    else:
        raise UserError(f"unknown caption format '{format}' (expected coco, karpathy or auto)")
    if not refs:
        raise UserError(f"{source}: no reference captions" + (f" in split '{split}'" if format == "karpathy" else ""))
    return refs


def load_predictions(predictions: str | Path | Mapping[Any, str] | Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """One caption per image id (as a string) from a results file/list ``[{"image_id", "caption"}]`` or a mapping.

    Raises:
        UserError: a field is missing or an image id appears twice.
    """
    source = str(predictions) if isinstance(predictions, str | Path) else "predictions"
    data = read_json(predictions) if isinstance(predictions, str | Path) else predictions
    if isinstance(data, Mapping):
        return {str(k): field(data, k, source, "top level", str) for k in data}
    out: dict[str, str] = {}
    for i, row in enumerate(json_list(data, source)):
        image_id = str(field(row, "image_id", source, f"[{i}]", (int, str)))
        if image_id in out:
            raise UserError(f"{source}: [{i}]: image_id {image_id} has a second caption")
        out[image_id] = field(row, "caption", source, f"[{i}]", str)
    return out


def _tokenize(captions: Mapping[str, list[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # one caption per line for the Java tokenizer: line breaks inside a caption would shift every later caption
    flat = {k: [{"caption": " ".join(c.split())} for c in v] for k, v in captions.items()}
    return PTBTokenizer().tokenize(flat)


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = METRICS,
    allow_missing: bool = False,
) -> dict[str, float]:
    """The COCO caption metrics of ``predictions`` (id -> caption) against ``references`` (id -> captions).

    Args:
        predictions: one caption per image id.
        references: the reference captions per image id (every predicted id must be there).
        metrics: any of ``bleu`` (BLEU-1..4), ``meteor``, ``rouge`` (ROUGE-L), ``cider`` (CIDEr-D).
        allow_missing: score only the predicted images when some reference images have no prediction (otherwise an
            error: a partial evaluation is not comparable to published numbers).

    Returns:
        ``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``, ``cider`` (those asked for) and ``images`` (how many).
    """
    unknown = [k for k in predictions if k not in references]
    if unknown:
        raise UserError(f"{len(unknown)} predicted image ids have no references (first: {unknown[0]})")
    missing = [k for k in references if k not in predictions]
    if missing and not allow_missing:
        raise UserError(f"{len(missing)} reference images have no prediction (first: {missing[0]}); "
                        "pass allow_missing (--allow-missing) to score only the predicted ones")  # fmt: skip
    bad = sorted(set(metrics) - set(METRICS))
    if bad or not predictions:
        raise UserError(f"unknown caption metrics {bad} (known: {', '.join(METRICS)})" if bad else "no predictions")
    ids = sorted(predictions)
    res = _tokenize({k: [predictions[k]] for k in ids})
    gts = _tokenize({k: list(references[k]) for k in ids})
    return _compute(gts, res, metrics) | {"images": float(len(ids))}


def _compute(gts: dict[str, list[str]], res: dict[str, list[str]], metrics: Sequence[str]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, float] = {}
    if "bleu" in metrics:
        scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out |= {f"bleu_{n}": float(s) for n, s in enumerate(scores, start=1)}
    if "meteor" in metrics:
        meteor = Meteor()  # a Java process, ended when the scorer is collected
        out["meteor"] = float(meteor.compute_score(gts, res)[0])
        del meteor
    if "rouge" in metrics:
        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if "cider" in metrics:
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out


def run(
    predictions: str | Path | Mapping[Any, str] | Sequence[Mapping[str, Any]],
    annotations: str | Path,
    format: CaptionFormat = "auto",
    split: str = "test",
    metrics: Sequence[str] = METRICS,
    allow_missing: bool = False,
) -> dict[str, float]:
    """Caption metrics from files: predictions (results JSON or mapping) against an annotation file."""
    references = load_references(annotations, format, split)
    return score_captions(load_predictions(predictions), references, metrics, allow_missing)


__all__ = ["METRICS", "SPICE_NOTE", "load_predictions", "load_references", "run", "score_captions"]
