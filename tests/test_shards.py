"""Pair shards: round trips, URL expansion, rank/worker splitting, determinism, exact resume, corrupt data."""

from __future__ import annotations

import functools
import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.core.image import ImageError, denormalize, load_image, normalize, to_pil, to_tensor
from vlpretrain.data.errors import DataError, SkipCounter
from vlpretrain.data.folder import ShardWriter
from vlpretrain.data.shards import (
    DataStream,
    PairShardDataset,
    StreamProtocol,
    braceexpand,
    collate_pairs,
    decode_pair,
    expand_urls,
    read_pair_shard,
    read_records,
)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def tiny_image(i: int, fmt: str = "PNG") -> bytes:
    return encode(Image.new("RGB", (4 + i % 3, 4), ((37 * i) % 256, (11 * i) % 256, 200)), fmt)


def write_shards(out: Path, n_shards: int, per_shard: int, prefix: str = "s") -> dict[str, dict]:
    """Shards of distinct samples (png and jpg alternate); returns key -> members written."""
    written = {}
    with ShardWriter(out, prefix=prefix, max_count=per_shard) as writer:
        for i in range(n_shards * per_shard):
            key = f"{prefix}{i:05d}"
            ext = "png" if i % 2 == 0 else "jpg"
            members = {ext: tiny_image(i, "PNG" if ext == "png" else "JPEG"), "txt": f"caption {i}", "json": {"i": i}}
            writer.write(key, members)
            written[key] = members
    return written


def sample_key(sample: dict) -> str:
    return sample["__key__"]


def keys_of(batches: list) -> list[str]:
    return [k for batch in batches for k in (batch["key"] if isinstance(batch, dict) else batch)]


def take(stream: DataStream, n: int) -> list:
    iterator = iter(stream)
    out = [next(iterator) for _ in range(n)]
    iterator.close()
    return out


# --------------------------------------------------------------------------------------------- reading shards


def test_round_trip_is_byte_identical(tmp_path):
    written = write_shards(tmp_path / "a", n_shards=3, per_shard=4)
    counter = SkipCounter()
    read = {
        s["__key__"]: s for url in expand_urls(str(tmp_path / "a" / "*.tar")) for s in read_pair_shard(url, counter)
    }
    assert list(read) == list(written) and not counter.counts
    for key, members in written.items():
        ext = "png" if "png" in members else "jpg"
        assert read[key][ext] == members[ext]
        assert read[key]["txt"] == members["txt"].encode()
        assert json.loads(read[key]["json"]) == members["json"]
    write_shards(tmp_path / "b", n_shards=3, per_shard=4)
    for name in ("s-000000.tar", "s-000001.tar", "s-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "s-000000.tar") as tar:
        assert [m.name for m in tar.getmembers()[:3]] == ["s00000.png", "s00000.txt", "s00000.json"]
        assert all(m.mtime == 0 for m in tar.getmembers())


def test_shard_writer_rejects_bad_keys(tmp_path):
    with ShardWriter(tmp_path, prefix="x") as writer:
        writer.write("a", {"txt": "x"})
        with pytest.raises(ValueError, match="'a' written twice"):
            writer.write("a", {"txt": "y"})
        with pytest.raises(ValueError, match="a.b"):
            writer.write("a.b", {"txt": "y"})
    assert [p.name for p in writer.shards] == ["x-000000.tar"]


def test_expand_urls(tmp_path):
    write_shards(tmp_path, n_shards=4, per_shard=1)
    names = [str(tmp_path / f"s-{i:06d}.tar") for i in range(4)]
    assert expand_urls(str(tmp_path / "*.tar")) == names
    assert expand_urls(str(tmp_path / "s-{000001..000003}.tar")) == names[1:]
    assert expand_urls(f"{names[2]},{names[0]}") == [names[2], names[0]]
    assert expand_urls(f"{names[3]}::{tmp_path}/s-00000{{0,1}}.tar") == [names[3], names[0], names[1]]
    assert expand_urls([names[1], Path(names[0])]) == [names[1], names[0]]
    assert expand_urls(str(tmp_path)) == names
    assert expand_urls("pipe:aws s3 cp s3://b/x-{0..1}.tar -") == ["pipe:aws s3 cp s3://b/x-0.tar -",
                                                                   "pipe:aws s3 cp s3://b/x-1.tar -"]  # fmt: skip
    missing = str(tmp_path / "nope-{0..2}.tar")
    with pytest.raises(DataError, match="nope-0.tar"):
        expand_urls(missing)
    with pytest.raises(DataError, match="matches no file"):
        expand_urls(str(tmp_path / "*.tgz"))
    with pytest.raises(DataError, match="pipe:"):
        expand_urls("s3://bucket/shard.tar")
    with pytest.raises(DataError, match="more than once"):
        expand_urls(f"{names[0]},{names[0]}")


def test_braceexpand():
    assert braceexpand("a{1..3}") == ["a1", "a2", "a3"]
    assert braceexpand("{008..010}.tar") == ["008.tar", "009.tar", "010.tar"]
    assert braceexpand("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert braceexpand("x{a,b{0..1}}") == ["xa", "xb0", "xb1"]
    assert braceexpand("lit{x}") == ["lit{x}"]
    with pytest.raises(DataError, match="unbalanced"):
        braceexpand("a{1..2")


def test_pipe_url_reads_end_to_end(tmp_path):
    written = write_shards(tmp_path, n_shards=1, per_shard=5)
    url = f"pipe:cat {tmp_path / 's-000000.tar'}"
    counter = SkipCounter()
    samples = list(read_pair_shard(url, counter))
    assert [s["__key__"] for s in samples] == list(written) and not counter.counts
    assert samples[0]["png"] == written["s00000"]["png"] and samples[0]["__shard__"] == url
    dataset = PairShardDataset(expand_urls(url), sample_key, batch_size=2)
    assert keys_of(list(DataStream(dataset))) == list(written)
    list(read_pair_shard(f"pipe:cat {tmp_path / 'missing.tar'} 2>/dev/null", counter))
    assert counter.counts == {"unreadable_shard": 1}


# ------------------------------------------------------------------------------------------ splitting, order


@pytest.mark.parametrize("n_shards", [6, 1])
def test_every_sample_once_over_ranks_and_workers(tmp_path, n_shards):
    written = write_shards(tmp_path, n_shards=n_shards, per_shard=12 // n_shards + 3)
    seen = Counter()
    for rank in range(2):
        dataset = PairShardDataset(str(tmp_path / "*.tar"), sample_key, batch_size=3, shuffle_buffer=4, seed=5,
                                   rank=rank, world_size=2)  # fmt: skip
        rank_keys = keys_of(list(DataStream(dataset, num_workers=2)))
        assert rank_keys, f"rank {rank} got nothing"
        seen.update(rank_keys)
    assert seen == Counter(list(written))


def test_order_depends_on_seed_only(tmp_path):
    written = write_shards(tmp_path, n_shards=3, per_shard=8)

    def order(seed: int, shuffle_buffer: int = 5) -> list[str]:
        dataset = PairShardDataset(str(tmp_path / "*.tar"), sample_key, batch_size=4, shuffle_buffer=shuffle_buffer,
                                   seed=seed)  # fmt: skip
        return keys_of(list(DataStream(dataset)))

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(3)) == sorted(written)
    assert order(0, shuffle_buffer=0) == list(written)


def test_epochs_reshuffle_in_infinite_mode(tmp_path):
    written = write_shards(tmp_path, n_shards=2, per_shard=6)
    dataset = PairShardDataset(str(tmp_path / "*.tar"), sample_key, batch_size=4, shuffle_buffer=3, infinite=True)
    keys = keys_of(take(DataStream(dataset), 6))  # 24 samples = 2 epochs
    assert sorted(keys[:12]) == sorted(written) == sorted(keys[12:])
    assert keys[:12] != keys[12:]


# ---------------------------------------------------------------------------------------------- exact resume


def write_resume_shards(tmp_path: Path) -> str:
    """5 shards x 7 samples, two of them with garbage image bytes (skipped at decode)."""
    with ShardWriter(tmp_path, prefix="r", max_count=7) as writer:
        for i in range(35):
            image = b"garbage" if i in (9, 23) else tiny_image(i)
            writer.write(f"r{i:03d}", {"png": image, "txt": f"a caption {i}"})
    return str(tmp_path / "r-{000000..000004}.tar")


@pytest.mark.parametrize(
    ("num_workers", "one_shard", "rank", "world_size"),
    [(0, False, 0, 1), (2, False, 0, 1), (2, True, 1, 2)],  # the last splits by sample: 4 slots, 1 shard
)
def test_exact_resume_across_epochs(tmp_path, num_workers, one_shard, rank, world_size):
    spec = write_resume_shards(tmp_path)
    spec = str(tmp_path / "r-000001.tar") if one_shard else spec

    def stream(state=None) -> DataStream:
        dataset = PairShardDataset(spec, functools.partial(decode_pair, image_size=6), batch_size=4,
                                   collate=collate_pairs, shuffle_buffer=5, seed=3, infinite=True, rank=rank,
                                   world_size=world_size)  # fmt: skip
        return DataStream(dataset, num_workers=num_workers, state=state)

    k, m = 7, 9  # 16 batches of 4 from 33 good samples per epoch: crosses an epoch boundary after the resume
    reference_stream = stream()
    reference = take(reference_stream, k + m)
    first = stream()
    head = take(first, k)
    assert one_shard or all(p[0] == 0 for p in first.positions.values())
    state = json.loads(json.dumps(first.state_dict()))
    resumed = stream(state)
    tail = take(resumed, m)
    assert keys_of(head + tail) == keys_of(reference)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(head + tail, reference, strict=True))
    assert all(p[0] >= 1 for p in resumed.positions.values()), "the tail must reach the next epoch"
    assert resumed.skipped == reference_stream.skipped and reference_stream.skipped["corrupt_image"] >= 1
    assert resumed.state_dict()["positions"] == reference_stream.state_dict()["positions"]


def test_resume_in_finite_mode_with_workers(tmp_path):
    spec = write_resume_shards(tmp_path)

    def stream(state=None) -> DataStream:
        dataset = PairShardDataset(spec, sample_key, batch_size=3, shuffle_buffer=4, seed=1)
        return DataStream(dataset, num_workers=2, state=state)

    full = keys_of(list(stream()))
    first = stream()
    head = take(first, 5)
    tail = list(stream(first.state_dict()))
    assert keys_of(head + tail) == full and len(full) == 35


def test_state_must_match_the_stream(tmp_path):
    spec = write_resume_shards(tmp_path)
    dataset = PairShardDataset(spec, sample_key, batch_size=3, infinite=True)
    assert isinstance(dataset, StreamProtocol)
    state = DataStream(dataset, num_workers=0).state_dict()
    with pytest.raises(DataError, match="num_workers"):
        DataStream(dataset, num_workers=2, state=state)


# ------------------------------------------------------------------------------------------------ bad data


def truncate_inside(path: Path, member: str) -> None:
    """Cut a tar in the middle of a member's data."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()
    path.write_bytes(data[: info.offset_data + info.size // 2])


def write_damaged_set(tmp_path: Path) -> tuple[set[str], dict[str, int]]:
    """Four shards: good, truncated, garbage images, missing caption + missing image; returns good keys, skips."""
    good: set[str] = set()
    with ShardWriter(tmp_path, prefix="d", max_count=6) as writer:
        for i in range(24):
            key, members = f"d{i:03d}", {"png": tiny_image(i), "txt": f"caption {i}", "json": {"i": i}}
            if i in (13, 15):
                members["png"] = b"\x89PNG\r\n\x1a\n garbage"
            if i == 19:
                del members["txt"]
            if i == 21:
                del members["png"]
            writer.write(key, members)
            if i not in (13, 15, 19, 21) and not 8 <= i < 12:
                good.add(key)
    truncate_inside(tmp_path / "d-000001.tar", "d008.png")  # keeps d006, d007; d008 is cut; d009..d011 are gone
    return good, {"truncated_shard": 1, "corrupt_image": 2, "missing_caption": 1, "missing_image": 1}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_damaged_shards_skip_and_count(tmp_path, num_workers):
    good, skips = write_damaged_set(tmp_path)
    dataset = PairShardDataset(str(tmp_path / "*.tar"), functools.partial(decode_pair, image_size=4), batch_size=4,
                               collate=collate_pairs, shuffle_buffer=3)  # fmt: skip
    stream = DataStream(dataset, num_workers=num_workers)
    keys = keys_of(list(stream))
    assert Counter(keys) == Counter(good)
    assert stream.skipped == skips
    assert "reason=truncated_shard" in stream.skip_report() and "d-000001.tar" in stream.skip_report()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_mode_names_shard_key_and_reason(tmp_path, num_workers):
    write_damaged_set(tmp_path)
    dataset = PairShardDataset(str(tmp_path / "*.tar"), functools.partial(decode_pair, image_size=4), strict=True)
    with pytest.raises(DataError, match=r"d-000001\.tar, key=d008, reason=truncated_shard"):
        list(DataStream(dataset, num_workers=num_workers))


@pytest.mark.parametrize("cut", ["mid_data", "member_boundary", "mid_header", "padding"])
def test_truncation_never_raises_and_keeps_earlier_samples(tmp_path, cut):
    written = write_shards(tmp_path, n_shards=1, per_shard=4)
    path = tmp_path / "s-000000.tar"
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    json2, png3 = members["s00002.json"], members["s00003.jpg"]
    end_of_json2 = json2.offset_data + 512
    offset = {"mid_data": png3.offset_data + 10, "member_boundary": end_of_json2, "mid_header": end_of_json2 + 100,
              "padding": json2.offset_data + json2.size + 3}[cut]  # fmt: skip
    path.write_bytes(path.read_bytes()[:offset])
    counter = SkipCounter()
    keys = [s["__key__"] for s in read_pair_shard(str(path), counter)]
    victim = "s00003" if cut == "mid_data" else "s00002"
    assert keys == [k for k in written if k < victim]
    assert counter.counts == {"truncated_shard": 1} and f"key={victim}" in counter.reports[0]


# --------------------------------------------------------------------------------------------------- pixels


def test_decode_pair_and_image_modes():
    rgba = Image.new("RGBA", (5, 3), (255, 0, 0, 0))  # fully transparent red: white after compositing
    sample = {"__key__": "k", "__shard__": "x", "png": encode(rgba), "txt": b" hi there ", "json": b'{"a": 1}'}
    example = decode_pair(sample, image_size=8)
    assert example["image"].shape == (3, 8, 8) and example["image"].dtype == torch.float32
    assert torch.allclose(example["image"], torch.ones(3, 8, 8))
    assert example["caption"] == "hi there" and example["meta"] == {"a": 1} and example["key"] == "k"
    for mode in ("L", "P", "LA", "1", "I;16"):
        assert load_image(encode(Image.new(mode, (3, 3)))).mode == "RGB"
    with pytest.raises(ImageError) as small:
        load_image(encode(Image.new("RGB", (1, 5))))
    assert small.value.reason == "image_too_small"
    with pytest.raises(ImageError) as bomb:
        load_image(png_claiming_size(20000, 20000))
    assert bomb.value.reason == "image_too_large"
    with pytest.raises(DataError, match="bad metadata"):
        decode_pair({**sample, "json": b"[1"}, image_size=4)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims another size (a decompression bomb as far as the header goes)."""
    data = bytearray(encode(Image.new("RGB", (2, 2))))
    ihdr = 8 + 8  # signature, chunk length + type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_tensor_round_trips():
    image = Image.new("RGB", (6, 4), (10, 120, 250))
    x = to_tensor(image)
    assert x.shape == (3, 4, 6) and to_pil(x).tobytes() == image.tobytes()
    assert torch.allclose(denormalize(normalize(x)), x, atol=1e-6)


def test_read_records(tmp_path):
    written = write_shards(tmp_path, n_shards=2, per_shard=3)
    images, records = read_records(str(tmp_path / "*.tar"), limit=4)
    assert [r["i"] for r in records] == [0, 1, 2, 3]
    assert images[0].shape == (4, 4, 3) and images[0].dtype.name == "uint8"
    assert len(written) == 6


def test_starting_a_stream_leaves_the_global_rng_alone(tmp_path) -> None:
    """Resuming re-creates the DataLoader; that must not shift the run's torch RNG (dropout, Gumbel noise)."""
    from vlpretrain.data.folder import ShardWriter
    from vlpretrain.data.synthetic import encode_png

    with ShardWriter(tmp_path, prefix="s", max_count=4) as writer:
        for i in range(8):
            writer.write(f"k{i}", {"png": encode_png(np.full((4, 4, 3), i, np.uint8)), "txt": f"caption {i}"})
    stream = DataStream(PairShardDataset(str(tmp_path / "*.tar"), batch_size=2, infinite=True), num_workers=2)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(stream))
    assert torch.equal(torch.rand(3), expected)
