"""Interleaved documents: MMC4 filtering and placement, OBELICS image forms, bad data, splitting, resume."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlpretrain.data.errors import DataError
from vlpretrain.data.interleaved import MMC4Dataset, ObelicsDataset, mmc4_items
from vlpretrain.data.shards import DataStream


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def info(name: str, sentence: int, sim: float) -> dict:
    return {"image_name": name, "matched_text_index": sentence, "matched_sim": sim, "raw_url": f"http://x/{name}"}


def write_mmc4(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(["a", "b", "c", "d", "e", "f"] + [f"m{j}" for j in range(8)]):
        (images / f"{name}.png").write_bytes(png((20 * i, 0, 0)))
    (images / "bad.png").write_bytes(b"not a png")
    lines = [
        # one image per sentence (b beats a), c below the threshold
        {"text_list": ["s0", "s1", "s2", "s3"],
         "image_info": [info("a.png", 0, 0.30), info("b.png", 0, 0.35), info("c.png", 2, 0.20), info("d.png", 3, 0.5)]},
        # 8 matched sentences: only the first 6 images are kept
        {"text_list": [f"t{j}" for j in range(8)], "image_info": [info(f"m{j}.png", j, 0.3) for j in range(8)]},
        # a missing and a corrupt image file: the document keeps e.png
        {"text_list": ["u0", "u1", "u2"],
         "image_info": [info("missing.png", 0, 0.4), info("e.png", 1, 0.4), info("bad.png", 2, 0.4)]},
        "{not json",
        # nothing passes the threshold: too few images
        {"text_list": ["v0"], "image_info": [info("f.png", 0, 0.1)]},
    ]  # fmt: skip
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return jsonl, images


def documents(dataset) -> list[dict]:
    return [doc for item in dataset for doc in item["batch"]]


def layout(doc: dict) -> list[str]:
    return [item["text"] if item["type"] == "text" else f"<{item['name']}>" for item in doc["items"]]


def test_mmc4_filtering_and_placement(tmp_path):
    jsonl, images = write_mmc4(tmp_path)
    dataset = MMC4Dataset(str(jsonl), images, batch_size=2)
    docs = documents(dataset)
    assert [d["key"] for d in docs] == ["docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:3"]
    assert layout(docs[0]) == ["s0", "<b.png>", "s1", "s2", "s3", "<d.png>"]
    assert layout(docs[1]) == [x for j in range(8) for x in ([f"t{j}", f"<m{j}.png>"] if j < 6 else [f"t{j}"])]
    assert layout(docs[2]) == ["u0", "u1", "<e.png>", "u2"]
    image = docs[0]["items"][1]["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    before = documents(MMC4Dataset(str(jsonl), images, image_first_prob=1.0, load_images=False))
    assert layout(before[0]) == ["<b.png>", "s0", "s1", "s2", "<d.png>", "s3"]
    assert isinstance(before[0]["items"][0]["image"], Path)
    mixed = [layout(d) for d in documents(MMC4Dataset(str(jsonl), images, image_first_prob=0.5, seed=4))]
    assert mixed == [layout(d) for d in documents(MMC4Dataset(str(jsonl), images, image_first_prob=0.5, seed=4))]


def test_mmc4_skips_are_counted_and_strict_names_the_line(tmp_path):
    jsonl, images = write_mmc4(tmp_path)
    stream = DataStream(MMC4Dataset(str(jsonl), images))  # the last skips follow the last batch
    assert len([d for batch in stream for d in batch]) == 3
    assert stream.skipped == {"missing_image": 1, "corrupt_image": 1, "malformed_json": 1, "too_few_images": 1}
    assert "file=" in stream.skip_report() and "missing.png" in stream.skip_report()
    with pytest.raises(DataError, match=r"docs\.jsonl, key=docs\.jsonl:3/missing\.png, reason=missing_image"):
        documents(MMC4Dataset(str(jsonl), images, strict=True))
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # the malformed line is now line 3
    with pytest.raises(DataError, match=r"docs\.jsonl, key=docs\.jsonl:3, reason=malformed_json"):
        documents(MMC4Dataset(str(jsonl), images, strict=True))


def test_mmc4_items_without_images():
    items = mmc4_items({"text_list": ["a"], "image_info": []}, "/nowhere")
    assert items == [{"type": "text", "text": "a"}]
    with pytest.raises(DataError, match="matched_text_index"):
        mmc4_items({"text_list": ["a"], "image_info": [info("x.png", 3, 0.9)]}, "/nowhere")


@pytest.mark.parametrize("n_files", [1, 5])
def test_documents_once_over_ranks_and_workers(tmp_path, n_files):
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes(png((1, 2, 3)))
    keys = set()
    for f in range(n_files):
        lines = [json.dumps({"text_list": [f"doc {f} {i}"], "image_info": [info("x.png", 0, 0.5)]}) for i in range(9)]
        (tmp_path / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
        keys |= {f"part{f}.jsonl:{i + 1}" for i in range(9)}
    seen = Counter()
    for rank in range(2):
        dataset = MMC4Dataset(str(tmp_path / "part*.jsonl"), images, batch_size=2, shuffle_buffer=3, rank=rank,
                              world_size=2, load_images=False, decode=doc_key)  # fmt: skip
        seen.update(k for batch in DataStream(dataset, num_workers=2) for k in batch)
    assert seen == Counter(keys)


def doc_key(doc: dict) -> str:
    return doc["key"]


def test_mmc4_resume_through_data_stream(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes(png((1, 2, 3)))
    for f in range(3):
        lines = [json.dumps({"text_list": [f"{f}.{i}"], "image_info": [info("x.png", 0, 0.5)]}) for i in range(5)]
        (tmp_path / f"p{f}.jsonl").write_text("\n".join(lines) + "\n")

    def stream(state=None) -> DataStream:
        dataset = MMC4Dataset(str(tmp_path / "p*.jsonl"), images, doc_key, batch_size=3, shuffle_buffer=2, seed=7,
                              infinite=True, load_images=False)  # fmt: skip
        return DataStream(dataset, num_workers=2, state=state)

    reference = iter(stream())
    expected = [next(reference) for _ in range(9)]
    reference.close()
    first = stream()
    head_iter = iter(first)
    head = [next(head_iter) for _ in range(4)]
    head_iter.close()
    tail_iter = iter(stream(json.loads(json.dumps(first.state_dict()))))
    tail = [next(tail_iter) for _ in range(5)]
    tail_iter.close()
    assert head + tail == expected


# ---------------------------------------------------------------------------------------------------- OBELICS


def write_parquet(path: Path, texts: list, images: list, image_type: pa.DataType) -> None:
    table = pa.table({"texts": pa.array(texts, pa.list_(pa.string())), "images": pa.array(images, pa.list_(image_type)),
                      "url": pa.array([f"http://doc/{i}" for i in range(len(texts))])})  # fmt: skip
    pq.write_table(table, path)


def test_obelics_image_forms_and_bad_files(tmp_path):
    red, green = png((255, 0, 0)), png((0, 255, 0))
    write_parquet(tmp_path / "a.parquet", [["hello", None, "world"], ["both", None], [None, "x"]],
                  [[None, red, None], [green, None], [green, None]], pa.binary())  # fmt: skip
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "g.png").write_bytes(green)
    write_parquet(tmp_path / "b.parquet", [[None, "path image"], [None, "remote", None]],
                  [["imgs/g.png", None], ["https://x.org/i.jpg", None, "imgs/none.png"]], pa.string())  # fmt: skip
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    write_parquet(tmp_path / "c.parquet", [["struct", None]], [[None, {"bytes": red, "path": None}]], struct)
    (tmp_path / "d.parquet").write_bytes(b"PAR1 this is not a parquet file")
    stream = DataStream(ObelicsDataset(str(tmp_path / "*.parquet"), batch_size=2, min_images=0))
    docs = [doc for batch in stream for doc in batch]
    assert [d["key"] for d in docs] == ["a.parquet:0", "a.parquet:2", "b.parquet:0", "b.parquet:1", "c.parquet:0"]
    assert layout(docs[0]) == ["hello", "<image1>", "world"]
    assert docs[0]["items"][1]["image"].getpixel((0, 0)) == (255, 0, 0)
    assert layout(docs[1]) == ["<image0>", "x"]
    assert layout(docs[2]) == ["<imgs/g.png>", "path image"]
    assert docs[2]["items"][0]["image"].getpixel((0, 0)) == (0, 255, 0)
    assert layout(docs[3]) == ["remote"]
    assert layout(docs[4]) == ["struct", "<image1>"]
    assert stream.skipped == {"bad_row": 1, "remote_image": 1, "missing_image": 1, "unreadable_file": 1}
    with pytest.raises(DataError, match=r"d\.parquet, key=-, reason=unreadable_file"):
        documents(ObelicsDataset(str(tmp_path / "d.parquet"), strict=True))
    assert len(documents(ObelicsDataset(str(tmp_path / "*.parquet")))) == 4  # min_images=1 drops b.parquet:1


def test_mmc4_compressed_files(tmp_path):
    jsonl, images = write_mmc4(tmp_path)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wb") as f:
        f.write(jsonl.read_bytes())
    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as archive:
        archive.writestr("docs.jsonl", jsonl.read_bytes())
    plain = [layout(d) for d in documents(MMC4Dataset(str(jsonl), images))]
    for name in ("docs.jsonl.gz", "docs.zip"):
        assert [layout(d) for d in documents(MMC4Dataset(str(tmp_path / name), images))] == plain
