"""Explicit prefix rules that map an official checkpoint's keys to ours (shared by every converter).

A rule says: keys of ``source`` (a file or part of the official release) that start with ``official`` become
``ours + rest`` in our state dict; ``ours = None`` marks keys that are known and intentionally unused. Nothing is
matched by shape or guessed: the longest matching prefix wins.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


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


__all__ = ["KeyRule", "official_name", "our_key", "rule_for"]
