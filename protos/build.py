"""`python -m protos.build`: generate Python code from every .proto under protos/.

Run at set-up (make setup). The .proto files are compiled with the repository
root as include path, so generated modules import as `protos.lorapool.v1.*`
without path hacks. Regenerates only when a .proto is newer than its output.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stale(proto: Path) -> bool:
    out = proto.with_name(proto.stem + "_pb2.py")
    return not out.is_file() or out.stat().st_mtime < proto.stat().st_mtime


def main() -> int:
    from grpc_tools import protoc

    protos = sorted((ROOT / "protos").rglob("*.proto"))
    todo = [p for p in protos if stale(p)]
    if not todo:
        return 0
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *(str(p.relative_to(ROOT)) for p in todo),
    ]
    code = protoc.main(args)
    if code != 0:
        sys.stderr.write(f"protoc failed ({code})\n")
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
