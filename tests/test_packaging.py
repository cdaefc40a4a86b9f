"""The distribution owns one import name, `k2serve`, and never shadows a real package of another name."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"k2serve": REPO / "proto" / "k2serve", "k2serve.cluster": REPO / "cluster",
           "k2serve.worker": REPO / "worker", "k2serve.router": REPO / "router", "k2serve.kernels": REPO / "kernels"}
BARE_NAMES = ("kernels", "router", "worker", "cluster")


def is_ours(spec) -> bool:
    """The spec loads one of this repository's package folders (the venv may live inside the repository)."""
    return spec is not None and Path(spec.origin or "").resolve().parent in FOLDERS.values()


def test_transformers_deepseek_v3_and_our_kernels_live_in_one_process():
    pytest.importorskip("transformers")
    from transformers import DeepseekV3ForCausalLM

    import k2serve.kernels

    assert DeepseekV3ForCausalLM.__name__ == "DeepseekV3ForCausalLM"
    assert Path(k2serve.kernels.__file__).resolve().parent == REPO / "kernels"
    theirs = importlib.util.find_spec("kernels")  # Hugging Face's (a dependency of transformers 5.x), if any
    assert not is_ours(theirs), theirs.origin


def test_no_bare_name_resolves_to_this_repository():
    for name in BARE_NAMES:
        assert not is_ours(importlib.util.find_spec(name)), name
    assert str(REPO) not in [str(Path(p or ".").resolve()) for p in sys.path]


def test_every_package_folder_is_in_the_distribution():
    """pyproject lists packages by hand (the folders are remapped): a new subpackage must be added there."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {k: REPO / v for k, v in tool["package-dir"].items()} == FOLDERS
    found = set()
    for name, folder in FOLDERS.items():
        found |= {".".join([name, *init.parent.relative_to(folder).parts]) for init in folder.rglob("__init__.py")}
    assert found == set(tool["packages"])


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_each_package_imports_from_its_folder(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == FOLDERS[name]
