"""Dependencies point one way (docs/architecture.md, Packages), and every package says what it owns and
what it must not import."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]

# module prefix -> the k2serve modules (by prefix) it may import; anything of k2serve not listed is forbidden
ALLOWED = {
    "k2serve.v1": ("k2serve.v1",),
    "k2serve.kernels": ("k2serve.kernels",),
    "k2serve.worker.model": ("k2serve.worker.model", "k2serve.worker.parallel", "k2serve.kernels"),
    "k2serve.worker": ("k2serve.worker", "k2serve.kernels", "k2serve.v1"),
    "k2serve.router.text": ("k2serve.router.text", "k2serve.router.errors"),
    "k2serve.router.pool": ("k2serve.router.pool", "k2serve.router.errors", "k2serve.router.metrics", "k2serve.v1"),
    "k2serve.router.generation": ("k2serve.router.generation", "k2serve.router.text", "k2serve.router.pool.worker",
                                  "k2serve.router.errors", "k2serve.router.metrics"),
    "k2serve.router.api": ("k2serve.router.api", "k2serve.router.context", "k2serve.router.generation",
                           "k2serve.router.text", "k2serve.router.pool.worker", "k2serve.router.config",
                           "k2serve.router.errors", "k2serve.router.metrics", "k2serve.router.drain"),
    "k2serve.router": ("k2serve.router",),
}
NO_TORCH = ("k2serve.worker.scheduler", "k2serve.worker.kv_cache", "k2serve.worker.config")
NO_HTTP = ("k2serve.router.generation", "k2serve.router.text", "k2serve.router.pool")


def modules() -> dict[str, Path]:
    """Every module of the distribution, by its import name."""
    out = {}
    for package, folder in TOOL["package-dir"].items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join([package, *parts]).removesuffix(".__init__")
            out.setdefault(name, path)
    return out


def imports(path: Path) -> set[str]:
    """Every absolute module name `path` imports, at any depth (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def rule(module: str) -> tuple[str, ...]:
    return ALLOWED[max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)]


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


CHECKED = sorted(m for m in modules() if m != "k2serve" and not within(m, ("k2serve.cluster",)))


@pytest.mark.parametrize("module", CHECKED)
def test_imports_point_one_way(module):
    path = modules()[module]
    ours = {n for n in imports(path) if n.startswith("k2serve.")}
    allowed = rule(module)
    # `from k2serve.x import y` lists both k2serve.x and k2serve.x.y: the module itself decides
    bad = sorted(n for n in ours if not within(n, allowed) and not any(within(m, allowed) and n.startswith(m + ".")
                                                                      for m in ours))
    assert not bad, f"{module} imports {bad}; it may import only {allowed}"
    if within(module, NO_TORCH):
        assert not {n for n in imports(path) if n == "torch" or n.startswith("torch.")}, module
    if within(module, NO_HTTP):
        assert not {n for n in imports(path) if n.split(".")[0] in ("fastapi", "starlette")}, module


@pytest.mark.parametrize("package", sorted(TOOL["packages"]))
def test_every_package_says_what_it_owns_and_what_it_must_not_import(package):
    doc = " ".join((importlib.import_module(package).__doc__ or "").split())
    assert len(doc.split()) >= 20 and "must not import" in doc, package
