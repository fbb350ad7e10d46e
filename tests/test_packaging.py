"""The wheel holds every module, and the installed wheel trains without the checkout.

`make test` runs on an editable install, which imports straight from the source folders and so
cannot notice a package missing from the wheel (the Dockerfile's non-editable install can). Here:

- the wheel built from the repo root holds every .py file of megatron_focusft/, kernels/ and
  patches/ (the last two as megatron_focusft/kernels/ and megatron_focusft/patches/), and nothing
  outside megatron_focusft/ besides its dist-info: no top-level `kernels` or `patches`;
- that wheel, installed into a fresh virtual environment, imports megatron_focusft from that
  environment and runs `focusft --help` and one `--mock-data` training iteration with a finite loss;
- the Dockerfile installs every dependency of pyproject.toml except torch (the container's);
- no regular package at the checkout root has the name of an installed distribution's module.

The fresh environment uses the same base interpreter and sees this environment's site-packages
(torch, megatron-core, ...) through a path line in a .pth file. Such a line only appends the folder
to sys.path: the .pth files inside it, among them the editable install's import hook, are not
run, so the checkout stays out of reach, and the test asserts that by the module's path. Building
(--no-build-isolation) and installing (--no-index) need no network.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# Where each source folder lands inside the wheel.
SOURCE_TREES = {
    ROOT / "megatron_focusft": "megatron_focusft",
    ROOT / "kernels": "megatron_focusft/kernels",
    ROOT / "patches": "megatron_focusft/patches",
}
TIMEOUT_S = 300


def _run(command: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Runs `command`; returns its stdout, or fails the test with both streams."""
    proc = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools' build folders go to the tmp dir, not the checkout: an in-tree build/lib keeps
    # copies of earlier builds that a later wheel would ship, hiding a package left out.
    config = out / "build.cfg"
    config.write_text(f"[build]\nbuild_base = {out / 'build'}\n[egg_info]\negg_base = {out}\n")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", out, ROOT], cwd=out, env={**os.environ, "DIST_EXTRA_CONFIG": str(config)})
    (path,) = out.glob("megatron_focusft-*.whl")
    return path


def test_wheel_holds_every_module(wheel: Path) -> None:
    expected = {f"{target}/{path.relative_to(source).as_posix()}"
                for source, target in SOURCE_TREES.items() for path in source.rglob("*.py")}
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(expected - names)
    assert not missing, f"{len(missing)} of {len(expected)} modules missing from {wheel.name}: {missing}"
    outside = sorted(name for name in names if name.split("/")[0] != "megatron_focusft"
                     and not name.split("/")[0].endswith(".dist-info"))
    assert not outside, f"{wheel.name} installs files outside megatron_focusft/: {outside}"


def test_no_checkout_folder_shadows_an_installed_distribution() -> None:
    # The checkout root is on sys.path under the test suite (and for `python -m` from it), where
    # a regular package of the checkout beats an installed one of the same name. kernels/ is a
    # namespace package for that reason (kernels/README.md): Hugging Face's `kernels`, which
    # transformers >= 5.25 imports, must come from site-packages.
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    regular = [folder.name for folder in ROOT.iterdir() if (folder / "__init__.py").is_file()]
    shadowing = {name: installed[name] for name in regular if set(installed.get(name, ())) - {"megatron-focusft"}}
    assert not shadowing, f"checkout folders shadow installed distributions' modules: {shadowing}"


def test_installed_wheel_trains_without_checkout(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys._base_executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python, focusft = venv / "bin" / "python", venv / "bin" / "focusft"
    fresh_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           cwd=tmp_path).strip())
    outer_sites = dict.fromkeys(sysconfig.get_path(key) for key in ("purelib", "platlib"))
    (fresh_site / "outer_site_packages.pth").write_text("".join(f"{site}\n" for site in outer_sites))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path)

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    module = Path(_run([python, "-c", "import megatron_focusft; print(megatron_focusft.__file__)"],
                       cwd=tmp_path, env=env).strip())
    assert module.resolve().is_relative_to(fresh_site.resolve()), (
        f"megatron_focusft imported from {module}, not from the fresh environment's {fresh_site}")

    assert "train" in _run([focusft, "--help"], cwd=tmp_path, env=env)
    log = _run([focusft, "train", "--mock-data", "--train-iters", "1", "--seq-length", "64",
                "--micro-batch-size", "1"], cwd=tmp_path, env=env)
    losses = [float(value) for value in re.findall(r"\blm loss (\S+)", log)]
    assert len(losses) == 1 and math.isfinite(losses[0]), f"expected one finite lm loss, got {losses}:\n{log}"


def test_dockerfile_installs_every_dependency() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    missing = [dep for dep in dependencies if Requirement(dep).name != "torch" and f'"{dep}"' not in dockerfile]
    assert not missing, f"Dockerfile does not install these pyproject dependencies (quoted, as written there): {missing}"
