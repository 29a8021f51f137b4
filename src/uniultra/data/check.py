"""Integrity check of a dataset folder (`uniultra data check DIR`).

Errors make the folder unusable as is (unpaired, unreadable, non-binary, size mismatch,
ambiguous stems). Warnings are legitimate but worth knowing: empty masks (busi's normal
images), duplicate images (busi's benign_433 / malignant_145), ignored files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uniultra.data.dataset import (
    IMAGES_DIR,
    MASKS_DIR,
    dataset_name,
    image_content_hash,
    list_folder,
    natural_sorted,
)
from uniultra.data.image_io import ImageReadError, read_image, read_mask


@dataclass(frozen=True)
class Finding:
    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class CheckReport:
    root: Path
    n_images: int = 0
    n_masks: int = 0
    n_pairs_ok: int = 0
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    empty_masks: list[str] = field(default_factory=list)
    duplicate_groups: list[list[str]] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of readable pairs
    foreground_fractions: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_dataset(root: str | Path, progress: bool = False) -> CheckReport:
    """Read every image and mask once and collect every problem (never stop at the first)."""
    root = Path(root)
    report = CheckReport(root=root)
    if not root.is_dir():
        report.errors.append(Finding(root, "dataset directory does not exist"))
        return report
    for subdir in (IMAGES_DIR, MASKS_DIR):
        if not (root / subdir).is_dir():
            report.errors.append(Finding(root / subdir, "folder is missing"))
    listing = list_folder(root)
    report.n_images, report.n_masks = len(listing.images), len(listing.masks)
    report.warnings.extend(Finding(p, "ignored: unsupported extension") for p in listing.ignored)
    _check_pairing(listing.images, listing.masks, report)
    hashes: dict[str, str] = {}
    stems = natural_sorted(set(listing.images) & set(listing.masks))
    for stem in _progress(stems, progress, dataset_name(root)):
        image_hash = _check_pair(stem, listing.images[stem][0], listing.masks[stem][0], report)
        if image_hash is not None:
            hashes[stem] = image_hash
    _record_duplicates(hashes, listing.images, report)
    if report.empty_masks:
        n_empty = len(report.empty_masks)
        report.warnings.append(Finding(root / MASKS_DIR, f"{n_empty} empty masks (no foreground)"))
    return report


def _check_pairing(images: dict[str, list[Path]], masks: dict[str, list[Path]], report: CheckReport) -> None:
    errors = report.errors
    for stem in natural_sorted(images):
        first = images[stem][0]
        if len(images[stem]) > 1:
            names = ", ".join(p.name for p in images[stem])
            errors.append(Finding(first, f"ambiguous stem {stem!r}: several images ({names})"))
        if stem not in masks:
            errors.append(Finding(first, f"no mask (expected {MASKS_DIR}/{stem}.png)"))
    for stem in natural_sorted(set(masks) - set(images)):
        errors.append(Finding(masks[stem][0], f"mask without an image (expected {IMAGES_DIR}/{stem}.<ext>)"))


def _check_pair(stem: str, image_path: Path, mask_path: Path, report: CheckReport) -> str | None:
    """Check one pair; returns the image's content hash when the image is readable."""
    image = _read_or_report(read_image, image_path, report)
    mask = _read_or_report(read_mask, mask_path, report)
    if image is None or mask is None:
        return None if image is None else image_content_hash(image)
    if image.shape[:2] != mask.shape:
        report.errors.append(Finding(mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but image "
                                                f"{image_path.name} is {image.shape[1]}x{image.shape[0]}"))
        return image_content_hash(image)
    report.n_pairs_ok += 1
    report.sizes.append(mask.shape)
    report.foreground_fractions.append(float(mask.mean()))
    if not mask.any():
        report.empty_masks.append(stem)
    return image_content_hash(image)


def _read_or_report(reader, path: Path, report: CheckReport) -> np.ndarray | None:
    try:
        return reader(path)
    except (ImageReadError, FileNotFoundError) as exc:
        problem = exc.problem if isinstance(exc, ImageReadError) else str(exc)
        report.errors.append(Finding(path, problem))
        return None


def _record_duplicates(hashes: dict[str, str], images: dict[str, list[Path]], report: CheckReport) -> None:
    by_hash: dict[str, list[str]] = {}
    for stem, image_hash in hashes.items():
        by_hash.setdefault(image_hash, []).append(stem)
    for members in by_hash.values():
        if len(members) > 1:
            group = natural_sorted(members)
            report.duplicate_groups.append(group)
            others = ", ".join(group[1:])
            report.warnings.append(Finding(images[group[0]][0], f"identical pixels to {others}"))
    report.duplicate_groups.sort()


def _progress(stems: list[str], enabled: bool, name: str):
    if not enabled:
        return stems
    from tqdm import tqdm

    return tqdm(stems, desc=f"check {name}", unit="pair", leave=False)


def format_report(report: CheckReport, verbose: bool = False) -> str:
    """Human-readable summary; every error is listed, long warning lists are shortened."""
    lines = [f"dataset {dataset_name(report.root)} ({report.root})",
             f"  images {report.n_images}, masks {report.n_masks}, readable pairs {report.n_pairs_ok}"]
    if report.sizes:
        heights, widths = zip(*report.sizes, strict=True)
        lines.append(f"  size (WxH): {min(widths)}-{max(widths)} x {min(heights)}-{max(heights)}")
        fractions = np.asarray(report.foreground_fractions)
        lines.append(f"  foreground fraction: median {np.median(fractions):.3f}, "
                     f"range {fractions.min():.3f}-{fractions.max():.3f}")
    lines.append(f"  empty masks: {len(report.empty_masks)}" + _stem_list(report.empty_masks, verbose))
    lines.append(f"  duplicate image groups: {len(report.duplicate_groups)}"
                 + "".join(f"\n    {' = '.join(group)}" for group in report.duplicate_groups))
    # Duplicates are already listed above; repeat them as warnings only when verbose.
    shown = [w for w in report.warnings if verbose or "identical" not in w.problem]
    lines.extend(f"WARNING {finding}" for finding in shown)
    lines.extend(f"ERROR {finding}" for finding in report.errors)
    verdict = "OK" if report.ok else f"FAILED: {len(report.errors)} error(s)"
    lines.append(f"{verdict}, {len(report.warnings)} warning(s)")
    return "\n".join(lines)


def _stem_list(stems: list[str], verbose: bool, limit: int = 8) -> str:
    if not stems:
        return ""
    shown = stems if verbose or len(stems) <= limit else [*stems[:limit], "..."]
    return f" ({', '.join(shown)})"
