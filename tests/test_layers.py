"""The package's layers (pyproject.toml [tool.importlinter], docs/ARCHITECTURE.md): one direction of
dependency, only public names across packages, and a contract that does fail on a new cycle."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_focusft"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every `import` / `from ... import` in a file, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
    return found


def test_the_layers_contract_holds():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_fails_on_an_added_cycle(tmp_path: Path):
    # The same tree with one upward import (masks -> engine): lint-imports must refuse it.
    shutil.copytree(PACKAGE, tmp_path / "megatron_focusft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    dense = tmp_path / "megatron_focusft" / "masks" / "dense.py"
    dense.write_text(dense.read_text() + "\nfrom megatron_focusft.engine import loss  # noqa: E402\n")
    result = _lint_imports(tmp_path, pythonpath=tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and "megatron_focusft.masks.dense -> megatron_focusft.engine" in result.stdout


def test_packages_import_only_public_names_of_other_packages():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for module, names, line in _imports(path):
            parts = module.split(".")
            if parts[0] != "megatron_focusft" or len(parts) < 2 or parts[1] == own:
                continue
            private = [n for n in names if n.startswith("_")] + [p for p in parts if p.startswith("_")]
            if private:
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {module} {private}")
    assert not offenders, "\n".join(offenders)


def test_kernels_and_patches_sit_at_the_bottom():
    # Shipped as megatron_focusft.kernels / .patches from folders the import graph cannot see:
    # they may use the masks (kernels evaluate them) and nothing else of the package.
    allowed = {"kernels": ("megatron_focusft.masks",), "patches": ()}
    offenders = []
    for folder, modules in allowed.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, _, line in _imports(path):
                if module.startswith("megatron_focusft") and not module.startswith(modules or ("\0",)):
                    if not module.startswith(f"megatron_focusft.{folder}"):
                        offenders.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not offenders, "\n".join(offenders)
