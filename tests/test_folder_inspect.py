"""Folder import (sidecar captions, captions.jsonl) and shard inspection (statistics, sample grid)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vlpretrain.data.errors import DataError, SkipCounter
from vlpretrain.data.folder import ShardWriter, import_folder
from vlpretrain.data.inspect import inspect_shards
from vlpretrain.data.shards import expand_urls, read_pair_shard


def save(path: Path, size: tuple[int, int], fmt: str, color=(200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path.read_bytes()


def make_folder(root: Path) -> dict[str, bytes]:
    """Six images: png, jpg, bmp, nested webp, an uncaptioned jpg and a corrupt png; returns originals by path."""
    originals = {
        "cat.png": save(root / "cat.png", (10, 8), "PNG"),
        "dog.jpg": save(root / "dog.jpg", (12, 12), "JPEG"),
        "bird.bmp": save(root / "bird.bmp", (6, 9), "BMP"),
        "sub dir/fish.webp": save(root / "sub dir" / "fish.webp", (16, 4), "WEBP"),
        "nocap.jpg": save(root / "nocap.jpg", (5, 5), "JPEG"),
    }
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return originals


def read_back(out: Path) -> dict[str, dict]:
    counter = SkipCounter()
    samples = {s["__key__"]: s for url in expand_urls(str(out / "*.tar")) for s in read_pair_shard(url, counter, False)}
    assert not counter.counts
    return samples


def test_import_with_sidecar_captions(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    originals = make_folder(src)
    for name, caption in [("cat", "a cat"), ("dog", "a dog on grass"), ("bird", "a bird"), ("sub dir/fish", "fish"),
                          ("broken", "never read")]:  # fmt: skip
        (src / f"{name}.txt").write_text(caption + "\n")
    report = import_folder(src, out, max_per_shard=2, quiet=True)
    assert (report.found, report.written) == (6, 4)
    assert report.skipped == {"missing_caption": 1, "corrupt_image": 1}
    assert any("nocap.jpg" in r and "missing_caption" in r for r in report.reports)
    assert [Path(p).name for p in report.shards] == ["shard-000000.tar", "shard-000001.tar"]
    samples = read_back(out)
    assert list(samples) == ["bird", "cat", "dog", "sub_dir_fish"]  # sorted relative paths
    assert samples["cat"]["png"] == originals["cat.png"] and samples["dog"]["jpg"] == originals["dog.jpg"]
    assert samples["sub_dir_fish"]["webp"] == originals["sub dir/fish.webp"]
    assert Image.open(io.BytesIO(samples["bird"]["png"])).size == (6, 9)  # BMP is re-encoded as PNG
    assert samples["dog"]["txt"] == b"a dog on grass"
    meta = json.loads(samples["sub_dir_fish"]["json"])
    assert meta["key"] == "sub_dir_fish" and meta["source"] == "sub dir/fish.webp" and meta["width"] == 16
    assert "imported 4 of 6" in str(report)
    again = import_folder(src, tmp_path / "again", max_per_shard=2, quiet=True)
    for a, b in zip(report.shards, again.shards, strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_import_with_captions_jsonl(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(src)
    lines = [{"file": "cat.png", "caption": "a cat"}, {"file": "sub dir/fish.webp", "caption": "a fish"},
             {"file": "gone.png", "caption": "no such image"}]  # fmt: skip
    (src / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = import_folder(src, out, image_size=3, allow_missing_caption=True, quiet=True)
    assert report.written == 5 and report.skipped == {"corrupt_image": 1} and report.unmatched_captions == 1
    samples = read_back(out)
    assert samples["cat"]["txt"] == b"a cat" and samples["dog"]["txt"] == b""
    assert min(Image.open(io.BytesIO(samples["dog"]["jpg"])).size) == 3  # downscaled, shorter side 3
    assert Image.open(io.BytesIO(samples["sub_dir_fish"]["jpg"])).size == (12, 3)
    (src / "captions.jsonl").write_text('{"file": "cat.png", "caption": "ok"}\n{"file": "dog.jpg"}\n')
    with pytest.raises(DataError, match=r"captions\.jsonl:2"):
        import_folder(src, tmp_path / "bad", quiet=True)


def test_inspect_statistics_and_grid(tmp_path):
    captions = ["one", "two words", "now three words", "a b c d", "the fifth caption has six words", "x"]
    with ShardWriter(tmp_path, prefix="i", max_count=4) as writer:
        for i, caption in enumerate(captions):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8) if i % 3 else (10, 6), (i * 40, 90, 160)).save(buf, format="PNG")
            writer.write(f"k{i}", {"png": buf.getvalue(), "txt": caption})
        writer.write("bad", {"png": b"garbage", "txt": "corrupt"})
        writer.write("nocaption", {"png": buf.getvalue()})
    grid = tmp_path / "grid.png"
    stats = inspect_shards(str(tmp_path / "i-*.tar"), grid_png=grid, n_grid=4, require_caption=True)
    assert stats["shards"] == 2 and stats["samples"] == 6
    assert stats["skipped"] == {"corrupt_image": 1, "missing_caption": 1}
    words = stats["caption_words"]
    assert (words["min"], words["max"], words["p50"]) == (1, 6, 2.5) and words["mean"] == pytest.approx(17 / 6, 1e-3)
    assert stats["image_sizes"] == {"8x8": 4, "10x6": 2} and stats["distinct_image_sizes"] == 2
    with Image.open(grid) as image:
        assert image.size == (2 * 136, 2 * (136 + 36))
    json.dumps(stats)
    assert inspect_shards(str(tmp_path / "i-*.tar"), max_samples=3)["samples"] == 3
