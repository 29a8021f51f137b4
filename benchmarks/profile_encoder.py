"""Where the image encoder's time goes: per block in PyTorch eager, per op in onnxruntime.

    .venv/bin/python benchmarks/profile_encoder.py [--preset mini] [--size 1024] [--threads 2] [--repeats 5]

Eager: forward hooks time every trunk block (labelled with its stage, token grid, width and
window or "global"), the patch embedding, the neck (and inside it the sine position encodings,
which `encode_image` computes and then drops) and the decoder's high-res projections; medians
over `--repeats` runs after one warm-up. onnxruntime: the encoder is exported as
`uniultra export onnx` does (MultiHeadAttention, high-res convs folded) and run with
onnxruntime's profiler; time is summed per op type and the heaviest nodes are listed.
Prints markdown. Timings on a shared machine are noisy: compare shares, not milliseconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-onnx", action="store_true")
    return parser.parse_args()


def eager_profile(model, x, repeats: int) -> tuple[list[tuple[str, float]], float]:
    import torch

    times: dict[str, list[float]] = collections.defaultdict(list)
    labels = timed_parts(model)
    handles = add_timers(model, labels, times)
    totals = []
    with torch.inference_mode():
        model.encode_image(x)
        times.clear()
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode_image(x)
            totals.append((time.perf_counter() - start) * 1000)
    for handle in handles:
        handle.remove()
    return median_rows(labels, times, repeats), statistics.median(totals)


HIGH_RES_LABEL = "high-res projections conv_s0 + conv_s1"


def timed_parts(model) -> dict[str, object]:
    """Label -> encoder module, in table order; the high-res projections (two modules) are None here."""
    enc = model.image_encoder
    trunk = enc.trunk
    grid = model.image_size // 4
    labels = {"patch embed": trunk.patch_embed}
    for i, block in enumerate(trunk.blocks):
        if block.q_stride is not None:
            grid //= block.q_stride[0]
        kind = "global" if block.window_size == 0 else f"window {block.window_size}"
        pool = ", q-pool" if block.q_stride is not None else ""
        labels[f"block {i:2d} ({grid}x{grid} tokens, C={block.attn.proj.out_features}, {kind}{pool})"] = block
    labels["neck (all)"] = enc.neck
    labels["  of which sine position encodings (unused by encode_image)"] = enc.neck.position_encoding
    labels[HIGH_RES_LABEL] = None
    return labels


def add_timers(model, labels: dict[str, object], times: dict[str, list[float]]) -> list:
    """Forward hooks appending each call's seconds to `times[label]`; both high-res projections under one label."""

    def hook_pair(name: str):
        def pre(_module, _inputs):
            times[name].append(-time.perf_counter())

        def post(_module, _inputs, _output):
            times[name][-1] += time.perf_counter()

        return pre, post

    handles = []
    for name, module in labels.items():
        if module is not None:
            pre, post = hook_pair(name)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    decoder = model.sam_mask_decoder
    for conv in (decoder.conv_s0, decoder.conv_s1):
        pre, post = hook_pair(HIGH_RES_LABEL)
        handles += [conv.register_forward_pre_hook(pre), conv.register_forward_hook(post)]
    return handles


def median_rows(labels: dict[str, object], times: dict[str, list[float]], repeats: int) -> list[tuple[str, float]]:
    """(label, median ms per run) of every part that ran."""
    rows = []
    for name in labels:
        samples = times.get(name, [])
        if not samples:
            continue
        # Modules called several times per run (position encodings, the two projections) are summed.
        per_run = len(samples) // repeats
        sums = [sum(samples[i * per_run:(i + 1) * per_run]) * 1000 for i in range(repeats)]
        rows.append((name, statistics.median(sums)))
    return rows


def onnx_profile(model, x, threads: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]], float]:
    import numpy as np
    import onnxruntime as ort

    from uniultra.export.onnx_export import DEFAULT_OPSET, EncoderGraph, _onnx_proto
    from uniultra.inference import onnx_format as md
    from uniultra.inference.onnx_predictor import session_options

    proto = _onnx_proto(EncoderGraph(model), (x,), md.ENCODER_INPUTS, md.ENCODER_OUTPUTS, DEFAULT_OPSET)
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {"image": x.numpy().astype(np.float32)}
        for _ in range(3):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-1]["ts"]
    by_op: collections.Counter = collections.Counter()
    by_node: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
            by_op[e["args"]["op_name"]] += e["dur"] / 1000
            shape = e["args"].get("output_type_shape") or [{}]
            by_node[f"{e['args']['op_name']} -> {list(shape[0].values())[0] if shape[0] else '?'}"] += e["dur"] / 1000
    return by_op.most_common(12), by_node.most_common(12), runs[-1]["dur"] / 1000


def main() -> int:
    args = parse_args()
    import torch

    from uniultra.models.image_model import SAM2ImageModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SAM2ImageModel.from_preset(args.preset, args.size).eval()
    x = torch.randn(1, 3, args.size, args.size)
    rows, total = eager_profile(model, x, args.repeats)
    print(f"## {args.preset} encoder at {args.size} px, {args.threads} threads\n")
    print(f"### PyTorch eager: encode_image median {total:.0f} ms ({args.repeats} runs)\n")
    print("| part | median ms | share |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {100 * ms / total:.0f}% |")
    if not args.skip_onnx:
        by_op, by_node, run_ms = onnx_profile(model, x, args.threads)
        print(f"\n### onnxruntime (profiled run {run_ms:.0f} ms)\n")
        print("| op type | ms | share |\n|---|---|---|")
        for name, ms in by_op:
            print(f"| {name} | {ms:.1f} | {100 * ms / run_ms:.0f}% |")
        print("\n| heaviest node kinds (op -> output shape) | ms |\n|---|---|")
        for name, ms in by_node:
            print(f"| {name} | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
