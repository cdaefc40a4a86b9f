"""Regenerate the k2serve.v1 Python stubs from the .proto files: ONE command.

    .venv/bin/python proto/generate.py            # writes beside the protos (proto/k2serve/v1/)
    .venv/bin/python proto/generate.py OUT_DIR    # writes OUT_DIR/k2serve/v1/ (the staleness test)

The protos are compiled with `-I proto`, so generated code imports its siblings as `k2serve.v1.*`,
which is how pyproject maps the package (`k2serve` -> proto/k2serve).
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIRS = ("k2serve", "k2serve/v1")


def proto_files() -> list[Path]:
    """Every .proto under proto/k2serve, sorted."""
    return sorted((PROTO_ROOT / "k2serve").rglob("*.proto"))


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto into `out_dir` (pb2, grpc and .pyi stubs); return the written .py/.pyi files."""
    from grpc_tools import protoc
    import grpc_tools

    out_dir = Path(out_dir)
    for pkg in PACKAGE_DIRS:
        (out_dir / pkg).mkdir(parents=True, exist_ok=True)
        init = out_dir / pkg / "__init__.py"
        if not init.exists():
            init.write_text("")
    include = Path(grpc_tools.__file__).parent / "_proto"
    rels = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *rels]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in (out_dir / "k2serve").rglob("*")
                  if p.suffix in (".py", ".pyi") and p.name != "__init__.py")  # package files are not generated


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT):
        print(path)
