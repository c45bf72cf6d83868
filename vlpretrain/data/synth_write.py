"""Write a shapes-world data set to disk: pair shards, interleaved documents and ``stats.json``.

Layout under ``out_dir``::

    stats.json                       counts, attribute histograms, the generating config
    {split}/{split}-000000.tar       img2dataset layout: {key}.png, {key}.txt (caption), {key}.json (record + qa)
    {split}/docs.jsonl               MMC4 schema: text_list, image_info[*].{image_name, matched_text_index, matched_sim}
    {split}/doc_images/{name}.png    the images the documents refer to

Generation is parallel over processes; the output does not depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpretrain.configs import to_dict
from vlpretrain.data.folder import ShardWriter
from vlpretrain.data.synthetic import SPLITS, SynthConfig, encode_png, make_document, make_example
from vlpretrain.progress import progress_bar

_CHUNK = 128


@dataclass
class _Pair:
    key: str
    png: bytes
    caption: str
    record: dict[str, Any]


def _pair_chunk(args: tuple[SynthConfig, str, int, int]) -> list[_Pair]:
    cfg, split, start, stop = args
    out = []
    for i in range(start, stop):
        ex = make_example(cfg, split, i)
        record = ex.scene.record() | {"caption": ex.caption, "qa": ex.qa}
        out.append(_Pair(ex.scene.key, encode_png(ex.image), ex.caption, record))
    return out


def _doc_chunk(args: tuple[SynthConfig, str, int, int]) -> list[tuple[dict[str, Any], list[tuple[str, bytes]]]]:
    cfg, split, start, stop = args
    return [make_document(cfg, split, i) for i in range(start, stop)]


def _chunks(cfg: SynthConfig, split: str, total: int) -> list[tuple[SynthConfig, str, int, int]]:
    return [(cfg, split, s, min(s + _CHUNK, total)) for s in range(0, total, _CHUNK)]


def _results(fn: Any, jobs: list[Any], pool: Any) -> Iterator[Any]:
    """Results of ``fn`` over ``jobs`` in order, through ``pool`` when there is one."""
    return pool.imap(fn, jobs) if pool is not None else map(fn, jobs)


def write_shapes_world(
    cfg: SynthConfig, out_dir: str | Path, workers: int = 2, progress: bool = True
) -> dict[str, Any]:
    """Generate every split of ``cfg`` under ``out_dir`` and return the statistics written to ``stats.json``.

    Args:
        cfg: what to generate.
        out_dir: destination folder (created; existing shards of the same names are overwritten).
        workers: generator processes (1 = in this process).
        progress: show a progress bar.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stats: dict[str, Any] = {"config": to_dict(cfg), "splits": {}}
    total = sum(cfg.count(s) + cfg.docs(s) for s in SPLITS)
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        with progress_bar("shapes world", total=total, enabled=progress) as advance:
            for split in SPLITS:
                split_dir = out / split
                split_dir.mkdir(exist_ok=True)
                pairs = _write_pairs(cfg, split, split_dir, pool, advance)
                docs = _write_docs(cfg, split, split_dir, pool, advance)
                stats["splits"][split] = pairs | docs
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - start
    stats["seconds"] = round(seconds, 3)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def _write_pairs(cfg: SynthConfig, split: str, split_dir: Path, pool: Any, advance: Any) -> dict[str, Any]:
    objects, colors, shapes, backgrounds, words = Counter(), Counter(), Counter(), Counter(), 0
    with ShardWriter(split_dir, prefix=split, max_count=cfg.shard_size) as writer:
        for chunk in _results(_pair_chunk, _chunks(cfg, split, cfg.count(split)), pool):
            for pair in chunk:
                writer.write(pair.key, {"png": pair.png, "txt": pair.caption, "json": pair.record})
                objs = pair.record["objects"]
                objects[len(objs)] += 1
                colors.update(o["color"] for o in objs)
                shapes.update(o["shape"] for o in objs)
                backgrounds[pair.record["background"]["kind"]] += 1
                words += len(pair.caption.split())
            advance(len(chunk))
        shard_names = [p.name for p in writer.shards]
    n = max(cfg.count(split), 1)
    return {
        "images": cfg.count(split),
        "shards": shard_names,
        "objects_per_image": {str(k): v for k, v in sorted(objects.items())},
        "colors": dict(sorted(colors.items())),
        "shapes": dict(sorted(shapes.items())),
        "backgrounds": dict(sorted(backgrounds.items())),
        "caption_words_mean": round(words / n, 2),
    }


def _write_docs(cfg: SynthConfig, split: str, split_dir: Path, pool: Any, advance: Any) -> dict[str, Any]:
    image_dir = split_dir / "doc_images"
    image_dir.mkdir(exist_ok=True)
    n_images = 0
    with open(split_dir / "docs.jsonl", "w") as f:
        for chunk in _results(_doc_chunk, _chunks(cfg, split, cfg.docs(split)), pool):
            for doc, images in chunk:
                f.write(json.dumps(doc) + "\n")
                for name, png in images:
                    (image_dir / name).write_bytes(png)
                n_images += len(images)
            advance(len(chunk))
    return {"docs": cfg.docs(split), "doc_images": n_images}
