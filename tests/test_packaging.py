"""Packaging: a light command line (no torch for help and data checks), configs and split files
shipped inside the package, and an installed wheel that predicts and fine-tunes on its own."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dataset_factory import REPO, write_dataset
from uniultra.cli import COMMAND_MODULES, COMMANDS, build_parser, chosen_command, main
from uniultra.commands.train import build_overrides, resolve_base
from uniultra.data.dataset import SPLITS_DIR_ENV, SegmentationDataset, resolve_split_file
from uniultra.engine.config import load_train_config
from uniultra.shipped import (
    is_config_name,
    package_dir,
    resolve_config,
    shipped_config_names,
    shipped_config_path,
    shipped_split_names,
    shipped_split_path,
)

SHIPPED_SPLITS = ["busi", "carotid", "ddti", "tg3k", "usgra_nerve", "usgra_vessel"]
HEAVY = ("torch", "numpy", "PIL", "yaml", "scipy")


def run_cli_and_list_modules(args: list[str], tmp_path: Path) -> tuple[int, set[str], str]:
    """Run `uniultra ARGS` in a fresh interpreter; its exit code, the top-level modules it imported
    and its output."""
    listing = tmp_path / "modules.json"
    code = (
        "import json, sys\n"
        "from uniultra.cli import main\n"
        "try:\n"
        f"    rc = main({args!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code or 0\n"
        f"open({str(listing)!r}, 'w').write(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    return done.returncode, set(json.loads(listing.read_text())), done.stdout + done.stderr


# --- (a) the command line stays light ----------------------------------------------------------

def test_help_imports_nothing_heavy(tmp_path):
    rc, modules, out = run_cli_and_list_modules(["--help"], tmp_path)
    assert rc == 0 and "train" in out and "data" in out
    assert not modules & set(HEAVY), modules & set(HEAVY)


def test_data_check_does_not_import_torch(tmp_path):
    from uniultra.data.phantom import write_phantom_dataset

    root = tmp_path / "mydata"
    write_phantom_dataset(root, 4, seed=0, size=64)
    rc, modules, out = run_cli_and_list_modules(["data", "check", str(root)], tmp_path)
    assert rc == 0 and "OK" in out
    assert "torch" not in modules
    rc, modules, out = run_cli_and_list_modules(["train", "--help"], tmp_path)
    assert rc == 0 and "finetune-" in out and "torch" not in modules  # help may wrap at the hyphen


def test_help_is_fast():
    # Best of three: the machine may be busy with training runs.
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "uniultra", "--help"], check=True, capture_output=True, timeout=60)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.5, times


def test_command_table_matches_the_modules():
    """The help of `uniultra --help` (from the table) is the help each module registers, and every
    command is registered by the module the table names."""
    for module in COMMAND_MODULES:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        __import__(module, fromlist=["register"]).register(sub)
        registered = {action.dest: action.help for action in sub._choices_actions}
        for name, help_text in registered.items():
            assert COMMANDS[name].module == module, name
            assert COMMANDS[name].help == help_text, name
    assert set(COMMANDS) == {"info", "pack", "average", "data", "evaluate", "predict", "demo", "train", "archive",
                             "distill", "auto", "serve", "export", "bench"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_parses(name, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser(name).parse_args([name, "--help"])
    assert done.value.code == 0 and f"uniultra {name}" in capsys.readouterr().out


def test_command_lookup_and_errors(capsys):
    assert chosen_command(["data", "check", "x"]) == "data"
    assert chosen_command(["--version"]) is None and chosen_command(["nope"]) is None
    assert chosen_command(["-h", "train"]) is None and chosen_command(["train", "-h"]) == "train"
    for argv in ([], ["nope"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


# --- (b) configs shipped in the package --------------------------------------------------------

def test_shipped_config_by_name(tmp_path):
    assert "finetune-default" in shipped_config_names()
    path = resolve_config("finetune-default")
    assert path == shipped_config_path("finetune-default") and path.parent == package_dir("configs")
    config = load_train_config(path, None, [str(tmp_path / "mydata")])
    assert (config.model.base, config.model.image_size, config.peft["method"]) == ("default", 256, "full")
    optim = config.optim
    assert (optim.name, optim.lr, optim.warmup_steps, optim.epochs, optim.batch_size, optim.ema) == (
        "adam", 2e-4, 50, 10, 4, 0.998)
    assert (config.loss.focal, config.loss.dice, config.loss.iou) == (0.2, 0.8, 1.0)
    assert set(config.prompts.train.modes) == {"box", "point", "box+point"}
    assert config.prompts.train.jitter == (0, 10, 20, 30)
    assert (config.prompts.val.mode, config.prompts.val.jitter) == ("box", 20)
    assert (config.out_dir, config.threads) == ("runs/finetune", None)
    # The default base becomes the bundled file, which is what the trainer loads.
    from uniultra.inference.loading import bundled_default_path

    assert resolve_base(config).model.base == str(bundled_default_path())


def test_config_files_win_and_unknown_names_list_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "finetune-default").write_text("optim: {epochs: 1}\n")  # an existing file wins
    assert resolve_config("finetune-default") == Path("finetune-default")
    assert is_config_name("mine") and not is_config_name("mine.yaml") and not is_config_name("cfg/mine")
    with pytest.raises(FileNotFoundError, match="shipped: .*finetune-default"):
        resolve_config("no-such-config")
    with pytest.raises(FileNotFoundError, match="config file missing.yaml does not exist"):
        resolve_config("missing.yaml")
    assert main(["train", "--config", "no-such-config", "--data", str(tmp_path)]) == 2
    assert "finetune-default" in capsys.readouterr().err


def test_base_option_names():
    def overrides(base):
        return build_overrides(argparse.Namespace(set_options=[], out=None, epochs=None, device=None,
                                                  progress=None, base=base))

    assert overrides("default") == {"model": {"base": "default"}}
    assert overrides("preset:tiny") == {"model": {"base": None, "preset": "tiny"}}
    assert overrides("x.pt") == {"model": {"base": "x.pt"}}


def test_finetune_the_default_by_config_name(tmp_path, monkeypatch):
    """`uniultra train --base default --config finetune-default --data DIR`, one step."""
    from uniultra.data.phantom import write_phantom_dataset

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "mydata"
    write_phantom_dataset(root, 6, seed=0, size=64)
    assert main(["data", "split", str(root), "--ratios", "4", "2", "0"]) == 0
    assert main(["train", "--base", "default", "--config", "finetune-default", "--data", str(root),
                 "--set", "optim.epochs=1", "--set", "threads=1", "--device", "cpu", "--no-progress"]) == 0
    log = json.loads((tmp_path / "runs" / "finetune" / "log.json").read_text())
    assert (tmp_path / "runs" / "finetune" / "best.pt").is_file()
    assert "uniultra-mini-default.safetensors" in json.dumps(log)


# --- (c) split files shipped in the package ----------------------------------------------------

def test_shipped_split_files():
    assert shipped_split_names() == SHIPPED_SPLITS
    assert not (REPO / "splits").exists()  # one copy only: the package's
    for name in SHIPPED_SPLITS:
        document = json.loads(shipped_split_path(name).read_text())
        stems = document["train"] + document["val"] + document["test"]
        assert len(stems) == len(set(stems)) == sum(document["counts"].values()) > 0, name
        assert document["dataset"] == name


def test_split_resolution_falls_back_to_the_package(tmp_path, monkeypatch):
    monkeypatch.delenv(SPLITS_DIR_ENV, raising=False)
    document = json.loads(shipped_split_path("busi").read_text())
    stems = document["test"][:3]
    root = write_dataset(tmp_path / "busi", stems)
    assert resolve_split_file(root) == shipped_split_path("busi")
    assert shipped_split_path("busi").parent == package_dir("splits")
    with pytest.raises(ValueError, match=r"busi\.json: split 'test' names"):  # the shipped file is read
        SegmentationDataset(root, split="test")
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    (env_dir / "busi.json").write_text(json.dumps({"train": [], "val": [], "test": stems[:1]}))
    monkeypatch.setenv(SPLITS_DIR_ENV, str(env_dir))
    assert resolve_split_file(root) == env_dir / "busi.json"  # the environment comes before the package


# --- (d) an installed wheel --------------------------------------------------------------------

def _copy_project(dest: Path) -> Path:
    """The files a wheel is built from, copied so that building leaves the work tree untouched."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


@pytest.mark.slow
def test_wheel_installs_predicts_and_finetunes(tmp_path):
    from PIL import Image

    from uniultra.data.phantom import write_phantom_dataset

    def check(*command, **kwargs) -> str:
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, **kwargs)
        assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
        return done.stdout

    start = time.perf_counter()
    project = _copy_project(tmp_path / "project")
    wheels = tmp_path / "wheels"
    check(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", project, "-w", wheels, cwd=project)
    (wheel,) = wheels.glob("uniultra-*.whl")
    venv = tmp_path / "venv"
    check(sys.executable, "-m", "venv", venv)
    python, uniultra = venv / "bin" / "python", venv / "bin" / "uniultra"
    # torch first and pinned (a local CPU wheel here), then the wheel with its other dependencies.
    check(python, "-m", "pip", "install", "-q", "torch==2.13.0")
    check(python, "-m", "pip", "install", "-q", wheel)
    installed = time.perf_counter() - start

    work = tmp_path / "work"  # away from the checkout: nothing may come from the source tree
    work.mkdir()
    data = work / "mydata"
    write_phantom_dataset(data, 8, seed=0, size=128)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in (SPLITS_DIR_ENV, "PYTHONPATH"):
        env.pop(name, None)

    def run(*args: str) -> str:
        return check(uniultra, *args, cwd=work, env=env)

    mask = np.asarray(Image.open(data / "masks" / "phantom_0000.png")) > 0
    ys, xs = np.nonzero(mask)
    box = [str(v) for v in (xs.min() - 3, ys.min() - 3, xs.max() + 3, ys.max() + 3)]
    run("predict", "--model", "default", "--image", str(data / "images" / "phantom_0000.png"),
        "--box", *box, "--out", "mask.png")
    predicted = np.asarray(Image.open(work / "mask.png")) > 0
    assert 2 * (predicted & mask).sum() / (predicted.sum() + mask.sum()) > 0.5

    # Shipped split files resolve from site-packages.
    probe = ("from uniultra.data.dataset import resolve_split_file; from uniultra.inference.loading import "
             "bundled_default_path; print(resolve_split_file('busi')); print(bundled_default_path())")
    split_file, default = check(python, "-c", probe, cwd=work, env=env).split()
    assert "site-packages" in split_file and split_file.endswith("uniultra/splits/busi.json")
    assert "site-packages" in default and Path(default).is_file()

    run("data", "check", str(data))
    run("data", "split", str(data), "--ratios", "6", "2", "0")
    out = run("train", "--base", "default", "--config", "finetune-default", "--data", str(data),
              "--set", "optim.epochs=1", "--out", "runs/ft", "--no-progress")
    assert "done: 1 epochs" in out and (work / "runs" / "ft" / "best.pt").is_file()
    print(f"wheel test: build + install {installed:.0f} s, total {time.perf_counter() - start:.0f} s")
