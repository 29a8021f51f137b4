"""Files shipped inside the package (configs and split files), found with importlib.resources.

Both live beside the code (`uniultra/configs/<name>.yaml`, `uniultra/splits/<dataset>.json`), so
they are in the wheel and resolve the same way from a source checkout and from an installed
package. This module imports nothing heavy: `uniultra --help` and `uniultra data check` use it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIGS_DIR = "configs"
SPLITS_DIR = "splits"
CONFIG_SUFFIXES = (".yaml", ".yml")


def package_dir(name: str) -> Path:
    """A folder of the installed `uniultra` package, as a file-system path."""
    folder = resources.files("uniultra").joinpath(name)
    # Installed wheels and editable installs are plain folders; a zipped install is not supported.
    return Path(str(folder))


def _names(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)


# --- configs -------------------------------------------------------------------------------------

def shipped_config_names() -> list[str]:
    """Names of the configs shipped with the package (`uniultra train --config NAME`)."""
    return _names(package_dir(CONFIGS_DIR), CONFIG_SUFFIXES)


def shipped_config_path(name: str) -> Path:
    """The file of shipped config `name`; FileNotFoundError listing the shipped names."""
    for suffix in CONFIG_SUFFIXES:
        path = package_dir(CONFIGS_DIR) / f"{name}{suffix}"
        if path.is_file():
            return path
    shipped = ", ".join(shipped_config_names()) or "none"
    raise FileNotFoundError(f"config {name!r} is neither a file nor a config shipped with uniultra "
                            f"(shipped: {shipped})")


def is_config_name(spec: str | Path) -> bool:
    """A bare name (`finetune-default`): no folder part and no .yaml/.yml suffix."""
    text = str(spec)
    return bool(text) and Path(text).name == text and Path(text).suffix.lower() not in CONFIG_SUFFIXES


def resolve_config(spec: str | Path) -> Path:
    """`--config SPEC`: an existing file, else the shipped config of that name (a bare name only);
    a missing file or unknown name raises FileNotFoundError (listing the shipped names)."""
    path = Path(spec)
    if path.is_file():
        return path
    if is_config_name(spec):
        return shipped_config_path(str(spec))
    raise FileNotFoundError(f"config file {spec} does not exist (shipped configs, by name: "
                            f"{', '.join(shipped_config_names()) or 'none'})")


# --- split files ---------------------------------------------------------------------------------

def shipped_split_names() -> list[str]:
    """Datasets with a split file shipped with the package."""
    return _names(package_dir(SPLITS_DIR), (".json",))


def shipped_split_path(dataset: str) -> Path:
    """Where the shipped split file of `dataset` is (or would be): `uniultra/splits/<dataset>.json`."""
    return package_dir(SPLITS_DIR) / f"{dataset}.json"
