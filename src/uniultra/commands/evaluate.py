"""`uniultra evaluate`: score a model or a baseline on dataset folders with fixed prompts."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from uniultra.commands.presence_gate import add_presence_gate_arg
from uniultra.commands.runtime_option import add_runtime_arg, model_spec
from uniultra.commands.tight_boxes import add_tight_boxes_arg


def register(subparsers) -> None:
    from uniultra.data.prompts import PROMPT_MODES

    parser = subparsers.add_parser(
        "evaluate",
        help="Dice/IoU/HD/HD95 of a model or baseline per dataset, with seeded prompts",
        description="MODEL is a checkpoint path, 'default', 'baseline:box' or 'baseline:ellipse'. "
                    "Metrics are computed at each image's native resolution.",
    )
    parser.add_argument("--model", required=True,
                        help="checkpoint path, 'default', baseline:box, baseline:ellipse, "
                        "or an ONNX export as onnx:DIR / onnx-int8:DIR / openvino:DIR / openvino-bf16:DIR "
                        "(or see --runtime)")
    parser.add_argument("--data", action="append", required=True, metavar="DIR",
                        help="dataset folder (images/, masks/); repeat for several datasets")
    parser.add_argument("--split", default=None,
                        help="split name (e.g. test); omitted = every image of each dataset")
    parser.add_argument("--splits", action="append", default=None, metavar="FILE",
                        help="explicit split file; repeat once per --data (default: DIR/splits.json, "
                             "$UNIULTRA_SPLITS_DIR/<name>.json, then the split shipped with uniultra, "
                             "uniultra/splits/<name>.json)")
    parser.add_argument("--prompt", choices=PROMPT_MODES, default="box",
                        help="prompts from the truth; 'none' = no prompt: the automatic head of a checkpoint "
                        "from `uniultra auto train` (the plain decoder, unprompted, for other models); "
                        "images with an empty mask are then scored too")
    parser.add_argument("--modality", default=None, metavar="NAME",
                        help="--prompt none with an automatic-mode checkpoint: decode every dataset through this "
                        "modality channel; any --prompt with a modality controller (MDKD student): encode every "
                        "dataset under this modality (default: each dataset's folder name; for a controller that "
                        "does not know it, the shared network)")
    parser.add_argument("--jitter", type=float, default=20.0,
                        help="box jitter: each side pushed out by uniform 0..J px at 1024 scale (default 20)")
    parser.add_argument("--size", type=int, default=None,
                        help="model input size (model methods only; default: the checkpoint's own)")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed (same prompts for every method)")
    parser.add_argument("--device", default="cpu")
    add_runtime_arg(parser)
    parser.add_argument("--postprocess", action="store_true",
                        help="model methods: clip each object's mask to its box + 10 px (at 1024 scale), keep its "
                        "largest component, fill holes")
    add_tight_boxes_arg(parser)
    add_presence_gate_arg(parser)
    parser.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                        help="pixel size in mm, ROW_MM COL_MM (or one value for square pixels): HD and HD95 "
                        "are then reported in mm (default: in pixels)")
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here (atomic)")
    parser.add_argument("--overlays", type=Path, default=None, metavar="DIR",
                        help="write DIR/<dataset>/<stem>.png: truth outline green, prediction red")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from uniultra.data.spacing import check_spacing
    from uniultra.evaluation.evaluate import check_method_prompt, evaluate, load_datasets, make_method
    from uniultra.evaluation.report import format_table, results_document, write_overlay

    spacing = check_spacing(args.spacing) if args.spacing else None
    datasets = load_datasets(args.data, args.split, args.splits)
    spec = args.model if args.model.startswith("baseline:") else model_spec(args, automatic=args.prompt == "none")
    method = make_method(spec, image_size=args.size, device=args.device, postprocess=args.postprocess,
                         modality=args.modality)
    check_method_prompt(method, args.prompt)
    if args.tight_boxes:
        from uniultra.inference.zoom import answer_tight_boxes

        answer_tight_boxes(getattr(method, "predictor", None), method.name)
    if args.presence_gate != "calibrated":
        from uniultra.inference.presence_gate import set_presence_gate

        set_presence_gate(getattr(method, "predictor", None), args.presence_gate)

    def save_overlay(item, prompt, prediction) -> None:
        path = args.overlays / item["dataset"] / f"{item['stem']}.png"
        write_overlay(path, item["image"], item["mask"], prediction, prompt)

    start = time.perf_counter()
    results = evaluate(method, datasets, prompt_mode=args.prompt, jitter=args.jitter, seed=args.seed,
                       on_image=save_overlay if args.overlays else None, progress=args.progress,
                       spacing=spacing)
    seconds = time.perf_counter() - start
    print(f"{method.name}, prompt {args.prompt}, jitter {args.jitter:g}, seed {args.seed}"
          + (f", split {args.split}" if args.split else ", all images"))
    print(format_table(results))
    print(f"{sum(len(r.rows) for r in results)} images in {seconds:.1f} s")
    if args.out:
        import json

        from uniultra.atomic import atomic_write_text

        document = results_document(results, command=canonical_command(args), config=_config(args),
                                    seconds=seconds)
        print(f"wrote {atomic_write_text(args.out, json.dumps(document, indent=1) + chr(10))}")
    return 0


def canonical_command(args: argparse.Namespace) -> str:
    """An equivalent command line with every option spelled out (defaults included)."""
    words = ["uniultra", "evaluate", "--model", args.model, *_repeated("--data", args.data)]
    words += _given("--split", args.split)
    words += _repeated("--splits", args.splits or [])
    words += ["--prompt", args.prompt, "--jitter", f"{args.jitter:g}", "--seed", str(args.seed)]
    words += _given("--modality", args.modality)
    if args.size is not None:  # not `_given`: a size of 0 is still spelled out
        words += ["--size", str(args.size)]
    words += _given("--runtime", args.runtime)
    words += _flag("--postprocess", args.postprocess) + _flag("--tight-boxes", args.tight_boxes)
    if args.presence_gate != "calibrated":
        words += ["--presence-gate", str(args.presence_gate)]
    if args.spacing:
        words += ["--spacing", *(str(value) for value in args.spacing)]
    words += _given("--out", args.out) + _given("--overlays", args.overlays)
    return shlex.join(words)


def _given(option: str, value) -> list[str]:
    """`option value`, or nothing when the value is empty (the option left at its default)."""
    return [option, str(value)] if value else []


def _repeated(option: str, values) -> list[str]:
    return [word for value in values for word in (option, str(value))]


def _flag(option: str, on: bool) -> list[str]:
    return [option] if on else []


def _config(args: argparse.Namespace) -> dict:
    config = {key: value for key, value in vars(args).items() if key != "func"}
    config = {key: str(value) if isinstance(value, Path) else value for key, value in config.items()}
    config["argv"] = sys.argv
    return config
