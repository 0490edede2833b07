"""A small process supervisor for `lorapool serve`: a table of children, kept alive.

A child that dies is logged with its name, pid, exit status (the signal's name when it was
killed) and uptime, and started again with the same command after an exponential backoff
(1 s, 2 s, 4 s, ... capped at 30 s; a child that stayed up for a minute starts over at 1 s).
`stop()` stops the children in reverse table order (so list Redis first and the workers
last), each with SIGTERM and its own timeout before SIGKILL.

Children run in their own process group: Ctrl-C in a terminal reaches only the supervisor,
which then stops them in order instead of all at once.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("lorapool")


@dataclass(frozen=True)
class ChildSpec:
    name: str  # "redis", "gateway", "worker-1": what log lines call it
    argv: Sequence[str]
    env: Mapping[str, str] | None = None  # None: inherit
    stop_timeout_s: float = 30.0  # SIGTERM, then SIGKILL after this long


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0
    cap_s: float = 30.0
    reset_after_s: float = 60.0  # uptime after which a death counts as the first again

    def delay(self, failures: int) -> float:
        """Seconds before restart number `failures` (1, 2, ...) of a child that keeps dying."""
        return float(min(self.cap_s, self.initial_s * 2 ** max(failures - 1, 0)))


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0  # deaths in a row, each after less than backoff.reset_after_s up
    restart_at: float | None = None  # when a dead child is due to start again
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


def describe_exit(returncode: int) -> str:
    """`killed by SIGKILL` for a negative return code, else `exited with status N`."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclass
class Supervisor:
    specs: Sequence[ChildSpec]
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.monotonic
    children: dict[str, Child] = field(init=False)

    def __post_init__(self) -> None:
        self.children = {s.name: Child(s) for s in self.specs}

    def start(self, name: str) -> None:
        child = self.children[name]
        child.proc = subprocess.Popen(
            list(child.spec.argv),
            env=None if child.spec.env is None else dict(child.spec.env),
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        child.started_at = self.clock()
        child.restart_at = None
        log.info("started %s (pid %d)", name, child.proc.pid)

    def dead(self) -> list[tuple[Child, int]]:
        """(child, exit status) of the children that exited and await no restart yet."""
        found = []
        for child in self.children.values():
            if child.proc is None or child.restart_at is not None:
                continue
            returncode = child.proc.poll()
            if returncode is not None:
                found.append((child, returncode))
        return found

    def check(self) -> None:
        """Log and schedule every child that died; start those whose backoff is over."""
        now = self.clock()
        for child, returncode in self.dead():
            uptime = now - child.started_at
            child.failures = 1 if uptime >= self.backoff.reset_after_s else child.failures + 1
            delay = self.backoff.delay(child.failures)
            child.restart_at = now + delay
            log.warning(
                "%s (pid %s) %s after %.0f s up; restarting in %.0f s",
                child.spec.name,
                child.pid,
                describe_exit(returncode),
                uptime,
                delay,
            )
        for child in self.children.values():
            if child.restart_at is not None and child.restart_at <= now:
                child.restarts += 1
                self.start(child.spec.name)

    def stop(self) -> None:
        """Stop every running child, last in the table first, each within its timeout."""
        for child in reversed(list(self.children.values())):
            proc = child.proc
            if proc is None or proc.poll() is not None:
                continue
            log.info("stopping %s (pid %d)", child.spec.name, proc.pid)
            proc.terminate()
            try:
                proc.wait(child.spec.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s did not stop within %.0f s; killing it",
                    child.spec.name,
                    child.spec.stop_timeout_s,
                )
                proc.kill()
                proc.wait()
