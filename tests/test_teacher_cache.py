"""The on-disk feature cache (`uniultra.distill.data.build_teacher_cache`) shared by two jobs.

Two runs side by side (two seeds of `uniultra auto train` on one base) share `cache_dir`. Before the
file lock, both wrote the same temporary files and the second rename failed with "No such file or
directory" (2026-12-06, two automatic heads started together).
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from uniultra.distill.data import build_teacher_cache

SIZE, N = 8, 6
SHAPES = {"embed": (2, SIZE // 2, SIZE // 2)}


class Images:
    name = "toy"

    def __len__(self) -> int:
        return N

    def image(self, i: int) -> np.ndarray:
        return np.full((1, SIZE, SIZE), i / N, dtype=np.float32)


def slow_features(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    time.sleep(0.3)  # long enough that the two jobs' builds would overlap without the lock
    pooled = torch.nn.functional.avg_pool2d(batch[:, :2], 2)
    return {"embed": pooled}


def build(directory: str, calls: multiprocessing.Queue) -> None:
    def counted(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.put(len(batch))
        return slow_features(batch)

    arrays = build_teacher_cache("toy-stem", directory, Images(), SHAPES, counted, "float32", batch_size=2)
    assert arrays["embed"].shape == (N, *SHAPES["embed"])


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_two_jobs_building_one_stem_both_succeed_and_compute_it_once(tmp_path: Path):
    context = multiprocessing.get_context("fork")
    calls = context.Queue()
    jobs = [context.Process(target=build, args=(str(tmp_path), calls)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0, 0]
    computed = []
    while not calls.empty():
        computed.append(calls.get())
    assert sum(computed) == N  # the job that waited found the cache published and computed nothing
    expected = slow_features(torch.stack([torch.from_numpy(Images().image(i)).expand(3, -1, -1) for i in range(N)]))
    cached = np.load(tmp_path / "toy-stem.embed.npy")
    np.testing.assert_allclose(cached, expected["embed"].numpy())
    assert not list(tmp_path.glob("*.partial"))


def test_a_published_stem_is_loaded_without_computing(tmp_path: Path):
    build_teacher_cache("toy-stem", tmp_path, Images(), SHAPES, slow_features, "float32", batch_size=3)

    def must_not_run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        raise AssertionError("the published cache was recomputed")

    arrays = build_teacher_cache("toy-stem", tmp_path, Images(), SHAPES, must_not_run, "float32")
    assert arrays["embed"].shape == (N, *SHAPES["embed"])
