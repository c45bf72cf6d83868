"""Explicit prefix rules that map an official checkpoint's keys to ours (shared by every converter).

A rule says: keys of ``source`` (a file or part of the official release) that start with ``official`` become
``ours + rest`` in our state dict; ``ours = None`` marks keys that are known and intentionally unused. Nothing is
matched by shape or guessed: the longest matching prefix wins. :func:`map_source` applies the rules to one official
file and sorts its keys into converted, known-unused, unexpected and mis-shaped ones; :func:`missing_by_source` names
the model keys no file provided, in official names; :func:`listed` shortens key lists for error messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_LISTED = 8


@dataclass(frozen=True)
class KeyRule:
    """Keys of ``source`` starting with ``official`` become ``ours + rest`` (``ours = None``: known, unused)."""

    source: str
    official: str
    ours: str | None


def rule_for(rules: Iterable[KeyRule], source: str, key: str) -> KeyRule | None:
    """The rule (longest official prefix) that covers ``key`` of ``source``, or None."""
    matching = [r for r in rules if r.source == source and key.startswith(r.official)]
    return max(matching, key=lambda r: len(r.official), default=None)


def our_key(rule: KeyRule, key: str) -> str | None:
    """Our name of the official ``key`` under ``rule`` (None for an intentionally unused key)."""
    return None if rule.ours is None else rule.ours + key[len(rule.official) :]


def official_name(rules: Iterable[KeyRule], ours: str) -> tuple[str, str]:
    """(source, official key) that our key ``ours`` is read from; a key no rule gives is a converter bug."""
    matching = [r for r in rules if r.ours is not None and ours.startswith(r.ours)]
    if not matching:
        raise RuntimeError(f"converter bug: no rule gives the model key {ours}")
    rule = max(matching, key=lambda r: len(r.ours or ""))
    return rule.source, rule.official + ours[len(rule.ours or "") :]


@dataclass
class MappedSource:
    """What :func:`map_source` made of one official file.

    Args:
        state: our key -> the file's tensor, cast and contiguous (keys whose shape fits the model only).
        provided: our keys the file holds, whatever their shape.
        unused: official key -> the rule that marks it known and intentionally unused, in file order.
        unexpected: official keys that no rule covers or whose our-name the model lacks, in file order.
        mismatched: ``"key: file (shape), model (shape)"`` for each official key of the wrong shape.
        dtypes: the file's dtypes without the ``torch.`` prefix (``"float32"``, ...).
    """

    state: dict[str, Tensor] = field(default_factory=dict)
    provided: set[str] = field(default_factory=set)
    unused: dict[str, KeyRule] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dtypes: set[str] = field(default_factory=set)

    def problems(self, mismatch_label: str = "shapes differ:", brackets: bool = False) -> list[str]:
        """The file's problems in words: ``unexpected keys <sorted keys>``, ``<mismatch_label> <keys and shapes>``."""
        found = [f"unexpected keys {listed(sorted(self.unexpected), brackets)}"] if self.unexpected else []
        return found + ([f"{mismatch_label} {listed(self.mismatched, brackets)}"] if self.mismatched else [])


def map_source(
    source: dict[str, Tensor],
    rule_of: Callable[[str], KeyRule | None],
    expected: Mapping[str, Tensor],
    dtype: torch.dtype | None = None,
    consume: bool = False,
) -> MappedSource:
    """Map every key of one official file by its rule and check it against the model's keys and shapes.

    Args:
        source: the file's flat state dict (official key -> tensor).
        rule_of: the rule covering an official key of this file (e.g. ``lambda k: rule_for(RULES, "lm", k)``).
        expected: our key -> a tensor of the model's shape (and dtype; meta tensors do).
        dtype: cast every converted tensor to this; None = to the dtype of ``expected[our key]``.
        consume: pop each key from ``source`` as it is handled (frees the file's copy as soon as it is cast).

    Returns:
        The sorted keys (see :class:`MappedSource`); nothing is raised: the caller words the errors.
    """
    out = MappedSource()
    for key in list(source):
        value = source.pop(key) if consume else source[key]
        out.dtypes.add(str(value.dtype).removeprefix("torch."))
        rule = rule_of(key)
        if rule is not None and rule.ours is None:
            out.unused[key] = rule
            continue
        ours = our_key(rule, key) if rule is not None else None
        if ours not in expected:
            out.unexpected.append(key)
            continue
        out.provided.add(ours)
        if value.shape != expected[ours].shape:
            out.mismatched.append(f"{key}: file {tuple(value.shape)}, model {tuple(expected[ours].shape)}")
        else:
            out.state[ours] = value.to(expected[ours].dtype if dtype is None else dtype).contiguous()
    return out


def missing_by_source(rules: Iterable[KeyRule], expected: Iterable[str], provided: set[str]) -> dict[str, list[str]]:
    """Source -> the official names of the ``expected`` model keys that no file ``provided`` (in ``expected`` order)."""
    rule_list = list(rules)
    missing: dict[str, list[str]] = {}
    for ours in expected:
        if ours not in provided:
            source, official = official_name(rule_list, ours)
            missing.setdefault(source, []).append(official)
    return missing


def listed(items: Sequence[str], brackets: bool = False, limit: int = MAX_LISTED) -> str:
    """The first ``limit`` items and a count of the rest: ``a, b (+3 more)``, or ``[a, b, ... and 3 more]``."""
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    if brackets:
        return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"
    return shown + (f" (+{more} more)" if more > 0 else "")


__all__ = ["KeyRule", "MappedSource", "listed", "map_source", "missing_by_source", "official_name", "our_key",
           "rule_for"]  # fmt: skip
