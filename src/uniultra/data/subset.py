"""The coreset subset file (written by `uniultra data coreset`, uniultra.distill.coreset).

'#' comment lines (method, k, seed, teacher and its sha256, split, date, ...), then one
`<dataset_label>/<stem>` per line, per dataset in selection order. A training config points at it
with `subset:` on a data entry (uniultra.engine.data.open_split).
"""

from __future__ import annotations

from pathlib import Path

from uniultra.atomic import atomic_write_text
from uniultra.data.dataset import SegmentationDataset

# The selection methods of uniultra.distill.coreset, named here so that `uniultra data coreset --help`
# needs no torch.
METHODS = ("kcenter", "gradient", "random")


def format_subset(selection: dict[str, list[str]], header: dict[str, object]) -> str:
    """'# key: value' header lines, then `<label>/<stem>` lines in the order given."""
    lines = ["# uniultra coreset subset: one <dataset>/<stem> per line; '#' lines are comments"]
    lines += [f"# {key}: {value}" for key, value in header.items()]
    lines += [f"{label}/{stem}" for label, stems in selection.items() for stem in stems]
    return "\n".join(lines) + "\n"


def write_subset(path: str | Path, selection: dict[str, list[str]], header: dict[str, object]) -> Path:
    return atomic_write_text(path, format_subset(selection, header))


def read_subset(path: str | Path) -> dict[str, list[str]]:
    """{dataset label: [stems]} of a subset file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file {path} does not exist (make it with `uniultra data coreset`)")
    selection: dict[str, list[str]] = {}
    seen: set[str] = set()
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        label, slash, stem = line.partition("/")
        if not slash or not label or not stem or "/" in stem:
            raise ValueError(f"subset file {path}, line {number}: expected <dataset>/<stem>, got {line!r}")
        if line in seen:
            raise ValueError(f"subset file {path}, line {number}: {line} is listed twice")
        seen.add(line)
        selection.setdefault(label, []).append(stem)
    return selection


def restrict_to_subset(dataset: SegmentationDataset, path: str | Path, label: str) -> SegmentationDataset:
    """Keep only the samples the subset file lists under `label` (in place; returns `dataset`)."""
    selection = read_subset(path)
    wanted = selection.get(label)
    if not wanted:
        listed = ", ".join(selection) or "no dataset"
        raise ValueError(f"subset file {path} selects no image of dataset {label!r} (it lists {listed}); "
                         "the labels are dataset folder names, or the data entry's `name`")
    available = {s.stem for s in dataset.samples}
    missing = [stem for stem in wanted if stem not in available]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"subset file {path}: {len(missing)} stems of {label!r} are not in its "
                         f"{dataset.split or 'all'} split ({shown})")
    keep = set(wanted)
    dataset.samples = [s for s in dataset.samples if s.stem in keep]
    return dataset
