"""Running a `uniultra` subcommand in two CPU processes (gloo) under torchrun, for the DDP tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from uniultra.engine.weights_hash import HASH_DIR_ENV

REPO = Path(__file__).resolve().parents[1]


def run_two_processes(subcommand: str, config_file: Path, hash_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`uniultra <subcommand> --config FILE --no-progress` on 2 processes, one thread each; every
    process writes the hash of its final weights into `hash_dir`. Returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", HASH_DIR_ENV: str(hash_dir),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "uniultra", subcommand, "--config", str(config_file), "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
