"""The package list, which pyproject.toml cannot express (everything else lives there).

The repo's top-level kernels/ and patches/ folders ship inside the package namespace, as
megatron_focusft.kernels and megatron_focusft.patches, so no top-level `kernels` or `patches`
module is ever installed. `[tool.setuptools.packages.find]` finds packages only under their own
folder names, and its result replaces any list given next to it, so it cannot add those two.
Here every package is found under megatron_focusft/ and each mapped folder: a new module or
subpackage ships without an edit (tests/test_packaging.py checks the wheel). kernels/ is a
namespace package (no __init__.py; kernels/README.md says why), so its packages are found as
namespace packages.
"""

from setuptools import find_namespace_packages, find_packages, setup

PACKAGE_DIR = {
    "megatron_focusft": "megatron_focusft",
    "megatron_focusft.kernels": "kernels",
    "megatron_focusft.patches": "patches",
}

NAMESPACE_FOLDERS = {"kernels"}

setup(
    package_dir=PACKAGE_DIR,
    packages=[f"{package}.{sub}" if sub else package for package, folder in PACKAGE_DIR.items()
              for sub in ["", *(find_namespace_packages if folder in NAMESPACE_FOLDERS else find_packages)(folder)]],
)
