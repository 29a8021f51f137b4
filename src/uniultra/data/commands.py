"""`uniultra data check DIR` and `uniultra data split DIR`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="check a dataset folder or make its train/val/test split")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _register_check(data_sub)
    _register_split(data_sub)


def _register_check(data_sub) -> None:
    check = data_sub.add_parser(
        "check",
        help="verify pairing, readability, sizes and binary masks; report empty masks and duplicates",
        description="Exit status 1 when any error is found; empty masks and duplicates are warnings.",
    )
    check.add_argument("dirs", nargs="+", metavar="DIR", help="dataset folder(s) with images/ and masks/")
    check.add_argument("-v", "--verbose", action="store_true", help="list every warning and empty-mask stem")
    check.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    check.set_defaults(func=run_check)


def _register_split(data_sub) -> None:
    from uniultra.data.split import DEFAULT_GROUP_REGEX

    split = data_sub.add_parser(
        "split",
        help="write a seeded, editable train/val/test split (splits.json)",
        description="Duplicates (identical pixels) and stems sharing a group key always share a split.",
    )
    split.add_argument("dir", metavar="DIR", help="dataset folder with images/ and masks/")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--ratios", type=float, nargs=3, default=[8, 1, 1], metavar=("TRAIN", "VAL", "TEST"))
    split.add_argument("--group-contiguous", action="store_true",
                       help="keep runs of numbered stems (video frames) together; see --gap")
    split.add_argument("--gap", type=int, default=1,
                       help="with --group-contiguous: numbers at most GAP apart join (default 1)")
    split.add_argument("--group-regex", default=DEFAULT_GROUP_REGEX,
                       help="stems with the same group(1) of this regex stay together "
                            "(default drops an _n<k> suffix; '' disables)")
    split.add_argument("--out", type=Path, default=None, help="output file (default DIR/splits.json)")
    split.set_defaults(func=run_split)


def run_check(args: argparse.Namespace) -> int:
    from uniultra.data.check import check_dataset, format_report

    failed = False
    for directory in args.dirs:
        report = check_dataset(directory, progress=args.progress and sys.stderr.isatty())
        print(format_report(report, verbose=args.verbose))
        failed = failed or not report.ok
    return 1 if failed else 0


def run_split(args: argparse.Namespace) -> int:
    from uniultra.data.dataset import require_dataset_dir
    from uniultra.data.split import SPLITS_FILENAME, make_split, write_split

    root = require_dataset_dir(args.dir)
    document = make_split(
        root,
        seed=args.seed,
        ratios=[_whole(r) for r in args.ratios],
        group_regex=args.group_regex or None,
        contiguous_gap=args.gap if args.group_contiguous else None,
        command=_split_command(args),
    )
    out = write_split(document, args.out or root / SPLITS_FILENAME)
    counts = ", ".join(f"{name} {n}" for name, n in document["counts"].items())
    n_groups = document["grouping"]["n_groups"]
    print(f"{document['dataset']}: {document['n_images']} images, {n_groups} groups -> {counts}; wrote {out}")
    return 0


def _whole(ratio: float) -> float | int:
    # Keep `8 1 1` as integers in the JSON a person will read and edit.
    return int(ratio) if float(ratio).is_integer() else ratio


def _split_command(args: argparse.Namespace) -> str:
    from uniultra.data.split import DEFAULT_GROUP_REGEX

    """The command that reproduces this split, written into the file for the next person."""
    words = ["uniultra", "data", "split", str(args.dir), "--seed", str(args.seed),
             "--ratios", *(str(_whole(r)) for r in args.ratios)]
    if args.group_contiguous:
        words += ["--group-contiguous", "--gap", str(args.gap)]
    if args.group_regex != DEFAULT_GROUP_REGEX:
        words += ["--group-regex", args.group_regex]
    return shlex.join(words)
