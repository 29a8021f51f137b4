"""`uniultra data check DIR`, `uniultra data split DIR` and `uniultra data coreset DIR ...`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="check a dataset folder, make its train/val/test split or "
                                              "choose a coreset")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _register_check(data_sub)
    _register_split(data_sub)
    _register_coreset(data_sub)


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


def _register_coreset(data_sub) -> None:
    from uniultra.data.subset import METHODS

    coreset = data_sub.add_parser(
        "coreset",
        help="choose the K most diverse training images (teacher features or gradients) for distillation",
        description="Writes a subset file (one <dataset>/<stem> per line) that a data entry's `subset:` "
                    "reads. See docs/data.md, 'Coreset selection'.",
    )
    coreset.add_argument("dirs", nargs="+", metavar="DIR", help="dataset folder(s) with images/, masks/ and a split")
    coreset.add_argument("--teacher", default=None, metavar="CKPT",
                         help="teacher checkpoint (needed by kcenter and gradient)")
    coreset.add_argument("--k", type=int, required=True, metavar="N", help="number of images to choose in all")
    coreset.add_argument("--method", choices=METHODS, default="kcenter")
    coreset.add_argument("--split", default="train", help="split to choose from ('all': every image)")
    coreset.add_argument("--seed", type=int, default=0, help="picks the first centre / the random sample")
    coreset.add_argument("--size", type=int, default=None, metavar="S",
                         help="teacher input size (default: the checkpoint's)")
    coreset.add_argument("--stratify", action=argparse.BooleanOptionalAction, default=True,
                         help="split K across the datasets by their share of images (default on)")
    coreset.add_argument("--stride8", action="store_true",
                         help="kcenter: also pool the teacher's stride-8 features")
    coreset.add_argument("--batch-size", type=int, default=8)
    coreset.add_argument("--device", default="cpu")
    coreset.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    coreset.add_argument("--cache-dir", default=None, metavar="DIR",
                         help="keep the features here and reuse them (keyed by teacher, size and files)")
    coreset.add_argument("--out", type=Path, required=True, metavar="FILE", help="subset file to write")
    coreset.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    coreset.set_defaults(func=run_coreset)


def run_check(args: argparse.Namespace) -> int:
    from uniultra.data.check import check_dataset, format_report

    failed = False
    for directory in args.dirs:
        report = check_dataset(directory, progress=args.progress and sys.stderr.isatty())
        print(format_report(report, verbose=args.verbose))
        failed = failed or not report.ok
    return 1 if failed else 0


def run_split(args: argparse.Namespace) -> int:
    from uniultra.data.dataset import SPLITS_FILENAME, require_dataset_dir
    from uniultra.data.split import make_split, write_split

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


def run_coreset(args: argparse.Namespace) -> int:
    from uniultra.data.dataset import SegmentationDataset
    from uniultra.data.subset import write_subset
    from uniultra.distill.coreset import select_indices

    if args.method != "random" and args.teacher is None:
        raise ValueError(f"--method {args.method} needs --teacher CKPT")
    datasets = [SegmentationDataset(d, split=None if args.split == "all" else args.split) for d in args.dirs]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset folder names must be distinct (they label the subset lines), got {names}")
    features, teacher = None, _teacher_identity(args)
    if args.method != "random":
        features, teacher["size"] = _coreset_features(args, datasets, teacher["sha256"])
    chosen = select_indices(args.method, [len(d) for d in datasets], args.k, args.seed,
                            stratify=args.stratify, features=features)
    selection = {d.name: [d.samples[i].stem for i in idx] for d, idx in zip(datasets, chosen, strict=True)}
    counts = ", ".join(f"{d.name} {len(selection[d.name])}/{len(d)}" for d in datasets)
    out = write_subset(args.out, selection, _coreset_header(args, counts, teacher))
    print(f"coreset {args.method} k={args.k} seed {args.seed}: {counts}; wrote {out}")
    return 0


def _teacher_identity(args: argparse.Namespace) -> dict:
    if args.teacher is None:
        return {"path": None, "sha256": None, "size": None}
    from uniultra.atomic import file_sha256

    if not Path(args.teacher).is_file():
        raise FileNotFoundError(f"teacher checkpoint {args.teacher} does not exist")
    return {"path": str(args.teacher), "sha256": file_sha256(args.teacher), "size": args.size}


def _coreset_features(args: argparse.Namespace, datasets, teacher_sha256: str) -> tuple[list, int]:
    """Per dataset, the (N, D) features of the method; and the teacher's input size."""
    import torch

    from uniultra.distill.coreset import dataset_features
    from uniultra.inference.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.teacher, image_size=args.size, device=args.device)
    progress = args.progress and sys.stderr.isatty()
    features = [dataset_features(model, d, args.method, seed=args.seed, stride8=args.stride8,
                                 batch_size=args.batch_size, cache_dir=args.cache_dir,
                                 teacher_sha256=teacher_sha256, progress=progress) for d in datasets]
    return features, model.image_size


def _coreset_header(args: argparse.Namespace, counts: str, teacher: dict) -> dict:
    """The subset file's header: everything needed to trace and reproduce the selection."""
    from datetime import UTC, datetime

    words = ["uniultra", "data", "coreset", *map(str, args.dirs), "--k", str(args.k), "--method", args.method,
             "--split", args.split, "--seed", str(args.seed), "--out", str(args.out)]
    words += ["--teacher", str(args.teacher)] if args.teacher else []
    words += ["--size", str(args.size)] if args.size else []
    words += [] if args.stratify else ["--no-stratify"]
    words += ["--stride8"] if args.stride8 else []
    features = {"kcenter": "avg+max pooled image embedding" + (" + stride-8 features" if args.stride8 else ""),
                "gradient": "loss gradient wrt the single-mask hypernetwork's last layer (exact boxes; "
                            "empty masks: no prompt)",
                "random": "none"}[args.method]
    return {
        "method": args.method, "k": args.k, "seed": args.seed, "split": args.split,
        "stratify": str(args.stratify).lower(), "features": features,
        "teacher": teacher["path"] or "none", "teacher_sha256": teacher["sha256"] or "none",
        "teacher_size": teacher["size"] or "none",
        "datasets": counts,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(words),
    }
