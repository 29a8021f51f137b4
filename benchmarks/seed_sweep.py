"""The loop shared by the seeded sweeps (bench_distill_seeds.py, bench_auto_seeds.py).

Every (arm, seed) not yet in the results file is trained and scored by `run_one`, and the file is
rewritten after each run, so an interrupted sweep keeps what it finished. The file is re-read before
each write: two sweeps (one per core) may add runs to the same file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from uniultra.atomic import atomic_write_text


def sweep(result: Path, header: dict, arms: Sequence[str], seeds: Sequence[int],
          run_one: Callable[[str, int], dict], describe: Callable[[dict], str]) -> dict:
    """Run what is missing; `header` updates the document's top-level keys. The final document."""
    document = _read(result)
    for seed in seeds:
        for arm in arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in document["runs"]):
                continue
            run = {"arm": arm, "seed": seed, **run_one(arm, seed), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            document = _read(result)
            document.update(header)
            document["runs"].append(run)
            atomic_write_text(result, json.dumps(document, indent=1))
            print(f"{arm} seed {seed}: {describe(run)}", flush=True)
    return document


def _read(result: Path) -> dict:
    return json.loads(result.read_text()) if result.is_file() else {"runs": []}
