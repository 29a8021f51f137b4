"""Seeded, leak-free train/val/test splits stored as editable JSON, and how they are found.

Images that must not be separated are grouped first, then whole groups are dealt to splits:
- exact duplicates (same decoded pixels) always share a split;
- stems with the same group key (regex, default: drop an `_n<k>` object suffix, so ddti's
  `12_1_n1` and `12_1_n2` stay together);
- with `contiguous_gap`, stems ending in numbers that differ by at most the gap (video frames).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from uniultra.atomic import atomic_write_text
from uniultra.data.dataset import dataset_name, image_content_hash, list_folder, natural_sorted
from uniultra.data.image_io import read_image

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
# Group 1 is the key: `_n<k>` marks the k-th object of one source image.
DEFAULT_GROUP_REGEX = r"^(.*?)(?:_n\d+)?$"
_NUMBERED_STEM = re.compile(r"^(.*?)(\d+)$")


# --- grouping ------------------------------------------------------------------------------

class _UnionFind:
    def __init__(self, items: Iterable[str]):
        self.parent = {item: item for item in items}

    def find(self, item: str) -> str:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)

    def union_all(self, items: Sequence[str]) -> None:
        for other in items[1:]:
            self.union(items[0], other)

    def groups(self) -> list[list[str]]:
        by_root: dict[str, list[str]] = {}
        for item in self.parent:
            by_root.setdefault(self.find(item), []).append(item)
        groups = [natural_sorted(members) for members in by_root.values()]
        return sorted(groups, key=lambda g: g[0])


def group_stems(
    stems: Sequence[str],
    *,
    group_regex: str | None = DEFAULT_GROUP_REGEX,
    contiguous_gap: int | None = None,
    content_hashes: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """Partition `stems` into groups that must land in the same split (sorted, deterministic)."""
    union = _UnionFind(stems)
    for members in _same_key(stems, group_regex):
        union.union_all(members)
    for members in _contiguous_runs(stems, contiguous_gap):
        union.union_all(members)
    for members in _same_hash(stems, content_hashes or {}):
        union.union_all(members)
    return union.groups()


def _same_key(stems: Sequence[str], group_regex: str | None) -> list[list[str]]:
    if not group_regex:
        return []
    pattern = re.compile(group_regex)
    by_key: dict[str, list[str]] = {}
    for stem in stems:
        match = pattern.search(stem)
        key = (match.group(1) if match.groups() else match.group(0)) if match else stem
        by_key.setdefault(key, []).append(stem)
    return [members for members in by_key.values() if len(members) > 1]


def _contiguous_runs(stems: Sequence[str], gap: int | None) -> list[list[str]]:
    """Runs of stems sharing a prefix whose trailing numbers are at most `gap` apart."""
    if not gap:
        return []
    by_prefix: dict[str, list[tuple[int, str]]] = {}
    for stem in stems:
        match = _NUMBERED_STEM.match(stem)
        if match:
            by_prefix.setdefault(match.group(1), []).append((int(match.group(2)), stem))
    runs: list[list[str]] = []
    for numbered in by_prefix.values():
        numbered.sort()
        run = [numbered[0][1]]
        for (previous, _), (number, stem) in zip(numbered, numbered[1:], strict=False):
            if number - previous > gap:
                runs.append(run)
                run = []
            run.append(stem)
        runs.append(run)
    return [run for run in runs if len(run) > 1]


def _same_hash(stems: Sequence[str], content_hashes: Mapping[str, str]) -> list[list[str]]:
    by_hash: dict[str, list[str]] = {}
    for stem in stems:
        if stem in content_hashes:
            by_hash.setdefault(content_hashes[stem], []).append(stem)
    return [members for members in by_hash.values() if len(members) > 1]


def hash_images(root: str | Path, stems: Sequence[str]) -> dict[str, str]:
    listing = list_folder(root)
    return {stem: image_content_hash(read_image(listing.images[stem][0])) for stem in stems}


# --- assignment ----------------------------------------------------------------------------

def assign_groups(groups: Sequence[Sequence[str]], ratios: Sequence[float], seed: int) -> list[list[str]]:
    """Shuffle groups with `seed`, then give each to the split furthest below its target size.

    The result depends only on the set of stems, the grouping, the ratios and the seed
    (groups are sorted before shuffling, so directory listing order does not matter).
    """
    if len(ratios) != len(SPLIT_NAMES) or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"ratios must be {len(SPLIT_NAMES)} non-negative numbers, sum > 0; got {ratios}")
    ordered = sorted((natural_sorted(g) for g in groups), key=lambda g: g[0])
    order = np.random.default_rng(seed).permutation(len(ordered))
    total = sum(len(g) for g in ordered)
    targets = [total * r / sum(ratios) for r in ratios]
    splits: list[list[str]] = [[] for _ in ratios]
    for index in order:
        deficits = [target - len(split) for target, split in zip(targets, splits, strict=True)]
        splits[int(np.argmax(deficits))].extend(ordered[index])
    return [natural_sorted(split) for split in splits]


def make_split(
    root: str | Path,
    *,
    seed: int = 0,
    ratios: Sequence[float] = (8, 1, 1),
    group_regex: str | None = DEFAULT_GROUP_REGEX,
    contiguous_gap: int | None = None,
    command: str | None = None,
) -> dict:
    """Build the split document for the paired stems of a dataset folder."""
    stems = list_folder(root).paired_stems()
    if not stems:
        raise ValueError(f"{root}: no image/mask pairs to split")
    groups = group_stems(
        stems, group_regex=group_regex, contiguous_gap=contiguous_gap, content_hashes=hash_images(root, stems)
    )
    assigned = assign_groups(groups, ratios, seed)
    document = {
        "dataset": dataset_name(root),
        "seed": seed,
        "ratios": list(ratios),
        "grouping": {
            "duplicates": "identical decoded pixels",
            "group_regex": group_regex,
            "contiguous_gap": contiguous_gap,
            "n_groups": len(groups),
            "n_grouped_images": sum(len(g) for g in groups if len(g) > 1),
        },
        "n_images": len(stems),
        "counts": {name: len(members) for name, members in zip(SPLIT_NAMES, assigned, strict=True)},
    }
    if command:
        document["command"] = command
    document.update(dict(zip(SPLIT_NAMES, assigned, strict=True)))
    return document


def write_split(document: dict, path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(document, indent=1) + "\n")
