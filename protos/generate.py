"""Generate the Python modules and type stubs of every ``.proto`` file here.

Run ``python -m protos.generate`` (or ``make protos``) from any directory.
The modules are written beside their ``.proto`` files unless an output
directory is given, which is how the staleness test compares them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTOS_DIR = Path(__file__).resolve().parent
ROOT = PROTOS_DIR.parent


def proto_files() -> list[Path]:
    """Return the ``.proto`` files of this package, sorted by name."""
    return sorted(PROTOS_DIR.glob("*.proto"))


def _plugin(name: str) -> str:
    # The mypy-protobuf plugins are console scripts installed beside the
    # interpreter, which need not be on PATH when the venv is not activated.
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found; install the dev extras: make venv")
    return found


def generate(out_dir: Path = ROOT) -> None:
    """Write ``*_pb2.py``, ``*_pb2_grpc.py`` and their ``.pyi`` stubs.

    ``out_dir`` receives a ``protos/`` folder of generated files. Raises
    RuntimeError when protoc reports an error.
    """
    include = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
    ]
    args += [str(path.relative_to(ROOT)) for path in proto_files()]
    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT,
        help="folder that receives protos/ (default: the source tree)",
    )
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
