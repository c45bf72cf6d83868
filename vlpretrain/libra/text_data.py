"""The text the demo's text-only LLaMA trains on before stage 1 freezes it: shapes-world captions and QA, plus a
fixed-order list of the attribute words in a share of the samples.

Why (measured, docs/libra.md): in captions and QA alone no text context determines a colour, shape or size word
except by copying from earlier in the row, which a tiny LM does not learn within the demo budget. Its output rows
for those words then stay almost identical (the spread of the ``lm_head`` rows of the 8 colours is 0.16 against
0.59 for the position words), and a frozen LM whose head cannot tell "red" from "blue" cannot be steered to say
either: stage 1 learned count and places but left the colour and shape cross-entropy at chance (ln 8, ln 5) in
every stage-1 variant tried. A list in a fixed order ("colors: red, green, ...") makes every attribute word
predictable from the one before it, so the LM learns a distinct output direction for each (as any real LLM
has); it is the only non-shapes-world text the demo LM sees.

:func:`write_text_shards` copies pair shards (img2dataset layout, as ``vlpretrain data synth`` writes them),
prefixing the ``.txt`` member of a deterministic share of the samples with :data:`ATTRIBUTE_LIST`; images, JSON
records (and so the QA the ``text-lm`` stage adds with ``with_qa``) are copied unchanged.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from vlpretrain.data.synthetic import COLORS, SHAPES, SIZES
from vlpretrain.errors import UserError


def _listing(noun: str, words: list[str]) -> str:
    return f"{noun}: " + (", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]) + "."


# every word is in the shapes-world vocabulary ("sizes" is not, hence the bare size pair)
ATTRIBUTE_LIST = " ".join(
    [_listing("colors", list(COLORS)), _listing("shapes", list(SHAPES)), " and ".join(SIZES) + "."]
)


def takes_list(key: str, share: float, seed: int) -> bool:
    """Whether sample ``key`` gets the attribute list (a stable hash of seed and key, below ``share``)."""
    digest = hashlib.sha256(f"libra-text/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def write_text_shards(src: str | Path, dst: str | Path, share: float = 0.5, seed: int = 0) -> dict[str, int]:
    """Copy every ``*.tar`` shard of ``src`` into ``dst``, prefixing the caption of a ``share`` of the samples with
    :data:`ATTRIBUTE_LIST`. Returns ``{"shards", "samples", "with_list"}``.

    Raises:
        UserError: ``src`` holds no shard, or ``share`` is outside [0, 1].
    """
    if not 0 <= share <= 1:
        raise UserError(f"share: {share} must be in [0, 1]")
    shards = sorted(Path(src).glob("*.tar"))
    if not shards:
        raise UserError(f"{src}: no .tar shards")
    out_dir = Path(dst)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"shards": len(shards), "samples": 0, "with_list": 0}
    for shard in shards:
        tmp = out_dir / (shard.name + ".tmp")
        with tarfile.open(shard) as reader, tarfile.open(tmp, "w") as writer:
            for member in reader:
                data = reader.extractfile(member).read() if member.isfile() else b""
                key, _, ext = member.name.rpartition(".")
                if ext == "txt":
                    counts["samples"] += 1
                    if takes_list(Path(key).name, share, seed):
                        counts["with_list"] += 1
                        data = f"{ATTRIBUTE_LIST} {data.decode('utf-8').strip()}".encode()
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime, info.mode = len(data), member.mtime, member.mode
                writer.addfile(info, io.BytesIO(data))
        tmp.replace(out_dir / shard.name)
    return counts


__all__ = ["ATTRIBUTE_LIST", "takes_list", "write_text_shards"]
