"""The floors of ARCHITECTURE.md: `lint-imports` (pyproject.toml [tool.importlinter]) checks the
package-to-package imports; what import-linter cannot express is checked here."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "uniultra"
# The command line: `cli` builds the top-level parser, `commands` the sub-commands'.
ARGPARSE_ALLOWED = ("cli.py", "commands/")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_command_line_imports_argparse():
    offenders = [
        str(path.relative_to(SRC)) for path in sorted(SRC.rglob("*.py"))
        if not str(path.relative_to(SRC)).startswith(ARGPARSE_ALLOWED)
        and any(name == "argparse" or name.startswith("argparse.") for name in imported_modules(path))
    ]
    assert not offenders, f"argparse belongs in uniultra.commands (or uniultra.cli), not in {offenders}"


def test_every_command_module_is_in_the_commands_package():
    from uniultra.cli import COMMAND_MODULES

    assert all(module.startswith("uniultra.commands.") for module in COMMAND_MODULES), COMMAND_MODULES


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.is_file():
        lint_imports = shutil.which("lint-imports")
    if lint_imports is None:
        pytest.skip("import-linter is not installed (it is in the `test` extra)")
    root = SRC.parent.parent
    done = subprocess.run([str(lint_imports), "--no-cache"], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
