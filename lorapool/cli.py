"""`lorapool`: the user-facing command. Subcommands live in a table; each is a module.

lorapool serve      gateway + worker (+ Redis) on the embedded defaults
lorapool generate   stream a reply through a gateway
lorapool run        the engine in-process, no gateway (offline use and debugging)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # imported only when the command runs (generate never loads torch)
    help: str

    def load(
        self,
    ) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
        mod = importlib.import_module(self.module)
        return mod.add_arguments, mod.run


COMMANDS: dict[str, Command] = {
    "serve": Command("lorapool.stack", "run a gateway and a worker on the embedded defaults"),
    "generate": Command("lorapool.client", "stream a generation from a gateway to stdout"),
    "run": Command("lorapool.local_run", "run the engine in-process and stream to the terminal"),
}


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lorapool", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    name = next((a for a in args_in if a in COMMANDS), None)
    for command, spec in COMMANDS.items():
        p = sub.add_parser(command, help=spec.help)
        if command == name:
            add_arguments, run = spec.load()
            add_arguments(p)
            p.set_defaults(run=run)
    args = parser.parse_args(args_in)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
