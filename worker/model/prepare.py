"""`python -m worker.model.prepare [MODEL]`: build the cached base model once (make setup)."""

from __future__ import annotations

import argparse
import logging
import sys

from worker.config import default_cache_dir
from worker.model.source import DEFAULT_MODEL, resolve_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = resolve_model_dir(args.model, default_cache_dir())
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
