"""`uniultra predict` (one image or a folder) and `uniultra demo` (phantoms or your images)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from uniultra.atomic import atomic_write_bytes
from uniultra.commands.presence_gate import add_presence_gate_arg
from uniultra.commands.runtime_option import add_runtime_arg, model_spec
from uniultra.commands.tight_boxes import add_tight_boxes_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_predict(subparsers)
    _register_demo(subparsers)


def _register_predict(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="segment an image (or a folder) with box / point prompts, or with none (automatic mode)",
        description="Segment one image with --image and prompts, or a folder with --input/--output "
        "(boxes from DIR/masks or from --boxes JSON). With --prompt none an automatic-mode checkpoint "
        "(`uniultra auto train`) segments without prompts. Inputs are never overwritten.",
    )
    _add_model_args(p)
    p.add_argument("--image", help="image file (png, jpg, bmp, tif, dcm)")
    p.add_argument("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"),
                   help="box in pixels; repeat for several objects (their masks are joined)")
    p.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), help="foreground click")
    p.add_argument("--negative", nargs=2, type=float, action="append", metavar=("X", "Y"), help="background click")
    p.add_argument("--prompt", choices=["none"], default=None,
                   help="none: no prompt at all, the automatic head of a checkpoint from `uniultra auto train` "
                   "(folder mode: every image; Dice against DIR/masks when present)")
    p.add_argument("--modality", metavar="NAME", default=None,
                   help="with --prompt none: the modality channel to decode with; with --point only (a tap) on a "
                   "zoomed model with an automatic head: the channel whose mask locates the tapped object (none "
                   "named: taps are answered without it); with a modality controller "
                   "(MDKD student): the modality to encode under (default: the --input folder's name if the "
                   "model knows it, else the model's only channel, or the controller's shared network)")
    add_presence_gate_arg(p)
    p.add_argument("--out", help="output mask PNG (0/255) for --image")
    p.add_argument("--overlay", help="also write an overlay PNG for --image")
    p.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                   help="pixel size in mm, ROW_MM COL_MM (or one value for square pixels): each object's area, "
                   "longest and orthogonal diameters and perimeter in mm (default: a DICOM's PixelSpacing or "
                   "ultrasound regions; none for other files)")
    p.add_argument("--json", metavar="FILE",
                   help="with --image: write the measurements as JSON (folder mode writes OUTPUT/measurements.json "
                   "whenever a spacing is known)")
    p.add_argument("--input", help="folder: DATASET layout (images/ + masks/) or plain images with --boxes")
    p.add_argument("--output", help="output folder for --input (masks/ and overlays/)")
    p.add_argument("--boxes", help='JSON {"<stem>": [[x0, y0, x1, y1], ...]} for --input')
    p.add_argument("--jitter", type=float, default=0.0, help="box jitter (px at 1024 scale) when boxes come from masks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="with --input: skip images whose mask and overlay are already in --output (a rerun after "
                   "Ctrl-C or failures does only what is missing)")
    p.set_defaults(func=run_predict)


def _register_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="segment example images with the bundled model and print Dice",
        description="Generate synthetic B-mode phantoms (or take --input DIR in the dataset layout), segment "
        "them with box prompts taken from their masks, write overlays and print per-image Dice next to the "
        "inscribed-ellipse baseline.",
    )
    _add_model_args(p)
    p.add_argument("--input", help="dataset folder (images/ + masks/) instead of phantoms")
    p.add_argument("--output", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--n", type=int, default=6, help="number of phantoms (default 6)")
    # The bundled model trained on phantoms of seeds 0..239: the demo draws other ones.
    p.add_argument("--seed", type=int, default=1000, help="phantom and box-jitter seed (default 1000)")
    p.add_argument("--jitter", type=float, default=20.0,
                   help="boxes loosened by up to J px (at 1024 scale), like a hand-drawn box (default 20)")
    p.set_defaults(func=run_demo)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="checkpoint path or 'default' (bundled UniUltra-mini)")
    p.add_argument("--size", type=int, default=None, help="model input size (default: the model's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_runtime_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--postprocess", action="store_true",
                   help="clip each object's mask to its box + margin, keep its largest component, fill holes")
    add_tight_boxes_arg(p)


def _predictor(args: argparse.Namespace):
    from uniultra.inference.loading import load_predictor
    from uniultra.inference.zoom import answer_tight_boxes

    spec = model_spec(args, automatic=getattr(args, "prompt", None) == "none")
    predictor = load_predictor(spec, image_size=args.size, device=args.device)
    if args.tight_boxes:
        answer_tight_boxes(predictor, args.model)
    return predictor


def _predict_predictor(args: argparse.Namespace, dataset: str | None = None):
    """The predictor of `uniultra predict`: an automatic head for --prompt none; its modality (the
    head's channel, or the controller's modality) chosen and checked."""
    from uniultra.inference.auto_predictor import check_modality_option, choose_modality, has_auto_head
    from uniultra.inference.presence_gate import CALIBRATED_GATE, set_presence_gate

    predictor = _predictor(args)
    automatic = args.prompt == "none"
    tap = not automatic and bool(getattr(args, "point", None)) and not getattr(args, "box", None)
    if automatic and not has_auto_head(predictor):
        raise ValueError(f"{args.model} has no automatic head, so --prompt none cannot segment with it: give "
                         "--box / --point prompts, or a checkpoint from `uniultra auto train`")
    check_modality_option(predictor, args.model, args.modality, automatic, tap=tap)
    if args.presence_gate != CALIBRATED_GATE:
        set_presence_gate(predictor, args.presence_gate)
    if predictor.selects_modality(automatic, tap=tap):
        try:
            predictor.modality = choose_modality(predictor, args.modality, dataset, required=not tap)
        except ValueError as exc:
            raise ValueError(f"{args.model}: {exc}") from exc
    return predictor


def _check_prompt_options(args: argparse.Namespace) -> None:
    given = [flag for flag, value in (("--box", args.box), ("--point", args.point), ("--negative", args.negative),
                                      ("--boxes", args.boxes)) if value]
    if args.prompt == "none" and given:
        raise ValueError(f"--prompt none takes no prompts; drop {', '.join(given)}")


def run_predict(args: argparse.Namespace) -> int:
    if args.image and args.input:
        raise ValueError("give either --image (one file) or --input (a folder), not both")
    _check_prompt_options(args)
    _given_spacing(args)  # a bad --spacing fails before any work
    if args.json and args.input:
        raise ValueError("--json is for --image; folder mode writes OUTPUT/measurements.json")
    if args.resume and not args.input:
        raise ValueError("--resume applies to folders: give it with --input DIR --output DIR")
    if args.input:
        if not args.output:
            raise ValueError("--input needs --output DIR")
        return _predict_folder(args)
    if not args.image or not args.out:
        raise ValueError("give --image IMG --out MASK.png (or --input DIR --output DIR)")
    return _predict_one(args)


def _predict_one(args: argparse.Namespace) -> int:
    from uniultra.data.image_io import read_image
    from uniultra.data.prompts import Prompt
    from uniultra.evaluation.report import overlay_image
    from uniultra.segment.folder import image_png_bytes, mask_png_bytes, refuse_overwriting_inputs, segment_image

    prompt = Prompt("none") if args.prompt == "none" else Prompt("cli", **_prompt_from_args(args))
    refuse_overwriting_inputs([Path(args.image)], [Path(p) for p in (args.out, args.overlay, args.json) if p])
    image = read_image(args.image)
    predictor = _predict_predictor(args)
    mask = segment_image(predictor, image, prompt, args.postprocess)
    atomic_write_bytes(args.out, mask_png_bytes(mask))
    if args.overlay:
        picture = overlay_image(image, np.zeros_like(mask), mask, prompt)
        atomic_write_bytes(args.overlay, image_png_bytes(picture))
    print(f"wrote {args.out}: {int(mask.sum())} foreground pixels of {mask.size}")
    if args.prompt == "none":
        print(_presence_line(predictor))
    _report_one(args, mask)
    return 0


def _presence_line(predictor) -> str:
    """How sure the automatic head is that the image holds its target, and the gate it was held to
    (the image's embedding is cached: this is one more decoder pass)."""
    score = predictor.predict_without_prompt()[1]
    if getattr(predictor, "gate_in_graph", False):  # an older export: its gate is inside its graph
        return f"presence probability {score:.3f}"
    gate = predictor.resolve_presence_gate()
    if gate is None:
        return f"presence probability {score:.3f} (no gate: the head always answers)"
    verdict = "below it: answered empty" if score < gate else "at or above it: answered"
    return f"presence probability {score:.3f}, gate {gate:.3f} ({verdict})"


def _given_spacing(args: argparse.Namespace):
    from uniultra.data.spacing import check_spacing

    return check_spacing(args.spacing) if args.spacing else None


def _report_one(args: argparse.Namespace, mask: np.ndarray) -> None:
    from uniultra.segment.measurements import describe, measurement_record

    record = measurement_record(args.image, mask, _given_spacing(args))
    print(describe(record))
    if args.json:
        _write_json(args.json, record)


def _report_folder(args: argparse.Namespace, jobs: list, run) -> None:
    """OUTPUT/measurements.json for the segmented images, when some image has a spacing."""
    from uniultra.segment.measurements import folder_records

    image_of = {job.stem: job.image_path for job in jobs}
    records = folder_records([(image_of[r.stem], r.mask_path) for r in run.results], _given_spacing(args))
    measured = sum(record["objects"] is not None for record in records)
    if measured:
        path = _write_json(Path(args.output) / "measurements.json", {"images": records})
        print(f"measurements of {measured} of {len(records)} images in {path}")


def _write_json(path, document: dict) -> Path:
    import json

    from uniultra.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(document, indent=1) + "\n")


def _prompt_from_args(args: argparse.Namespace) -> dict:
    """Boxes (N, 4) and clicks; with one box, the clicks refine it; with no box, clicks alone."""
    clicks = [(p, 1) for p in args.point or []] + [(p, 0) for p in args.negative or []]
    if not args.box and not clicks:
        raise ValueError("give at least one --box X0 Y0 X1 Y1 or --point X Y (or --prompt none with an "
                         "automatic-mode checkpoint from `uniultra auto train`)")
    boxes = np.asarray(args.box, dtype=np.float64) if args.box else None
    points = labels = None
    if clicks:
        if boxes is not None and len(boxes) > 1:
            raise ValueError("clicks can refine one box only; give a single --box with --point/--negative")
        points = np.asarray([[c for c, _ in clicks]], dtype=np.float64)
        labels = np.asarray([[lbl for _, lbl in clicks]], dtype=np.int64)
    return {"boxes": boxes, "points": points, "labels": labels}


def _predict_folder(args: argparse.Namespace) -> int:
    """Every good file segmented, every bad one listed at the end (exit 1); Ctrl-C exits 130."""
    from uniultra.segment.folder import FolderRun, run_jobs
    from uniultra.segment.plan import plan_folder

    # The inputs are checked before the model is loaded, so bad files show up at once.
    plan = plan_folder(args.input, args.boxes, args.jitter, args.seed, args.prompt or "box")
    if plan.failures:
        print(f"{len(plan.failures)} of the inputs cannot be segmented (listed again at the end):\n"
              + _listed(plan.failures), file=sys.stderr, flush=True)
    run = FolderRun(failures=list(plan.failures), skipped=list(plan.skipped))
    try:
        # Nothing left to segment: no model to load.
        predictor = _predict_predictor(args, dataset=Path(args.input).resolve().name) if plan.jobs else None
        for outcome in run_jobs(predictor, plan.jobs, args.input, args.output, args.postprocess, args.resume,
                                progress=not args.no_progress):
            run.add(outcome)
    except KeyboardInterrupt:
        # One line, no traceback: every output written so far is complete (atomic, in pairs).
        fresh_line = "" if args.no_progress else "\n"  # off the progress bar's line
        print(f"{fresh_line}uniultra predict: interrupted after {len(run.results)} of {len(plan.jobs)} images; "
              "rerun with --resume to finish", file=sys.stderr)
        return 130
    _print_folder_summary(run, args.output)
    _report_folder(args, plan.jobs, run)
    return 1 if run.failures else 0


def _print_folder_summary(run, output: str) -> None:
    results = run.results
    scored = [r.dice for r in results if r.dice is not None]
    summary = f", mean Dice {100 * np.mean(scored):.2f}" if scored else ""
    resumed = sum(r.resumed for r in results)
    kept = f" ({resumed} already done, kept)" if resumed else ""
    print(f"segmented {len(results)} images into {output}{kept}{summary}")
    if run.skipped:
        print(f"{len(run.skipped)} images not segmented (nothing to segment):\n" + _listed(run.skipped, limit=10))
    if run.failures:
        print(f"{len(run.failures)} FAILED:\n" + _listed(run.failures), file=sys.stderr)


def _listed(items: list, limit: int | None = None) -> str:
    shown = items if limit is None else items[:limit]
    more = [f"  ... and {len(items) - len(shown)} more"] if len(shown) < len(items) else []
    return "\n".join([f"  {item}" for item in shown] + more)


def run_demo(args: argparse.Namespace) -> int:
    from uniultra.data.phantom import write_phantom_dataset
    from uniultra.segment.folder import segment_folder

    output = Path(args.output)
    start = time.perf_counter()
    predictor = _predictor(args)
    source = Path(args.input) if args.input else write_phantom_dataset(output / "phantoms", args.n, seed=args.seed)
    run = segment_folder(predictor, source, output, jitter=args.jitter, seed=args.seed,
                         progress=not args.no_progress, postprocess=args.postprocess)
    results = run.results
    if run.failures:
        print(f"{len(run.failures)} FAILED:\n" + _listed(run.failures), file=sys.stderr)
    print(f"{len(results)} images from {source}, box prompts from the masks, jitter {args.jitter:g} px at 1024 scale")
    print(_demo_table(results, args.model))
    print(f"overlays in {output / 'overlays'}, masks in {output / 'masks'} ({time.perf_counter() - start:.1f} s)")
    return 1 if run.failures else 0


def _demo_table(results: list, model: str) -> str:
    lines = [f"{'image':<24} {'objects':>7} {'Dice ' + model:>16} {'Dice ellipse':>13}"]
    lines += [f"{r.stem:<24} {r.n_objects:>7} {100 * r.dice:>16.2f} {100 * r.ellipse_dice:>13.2f}" for r in results]
    if results:
        lines.append(f"{'mean':<24} {'':>7} {100 * np.mean([r.dice for r in results]):>16.2f} "
                     f"{100 * np.mean([r.ellipse_dice for r in results]):>13.2f}")
    return "\n".join(lines)
