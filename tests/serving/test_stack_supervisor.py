"""lorapool.supervisor with small Python children: restart, backoff, logging, ordered stop."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from lorapool.supervisor import Backoff, ChildSpec, Supervisor, describe_exit

CHILD = """
import signal, sys, time
name, out, ready = sys.argv[1], sys.argv[2], sys.argv[3]
def bye(*_):
    with open(out, "a") as f:
        f.write(name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if name == "stubborn" else bye)
open(ready, "w").close()
while True:
    time.sleep(1)
"""


def sleeper(name: str, tmp: Path, stop_timeout_s: float = 30.0) -> ChildSpec:
    argv = [sys.executable, "-c", CHILD, name, str(tmp / "stopped"), str(tmp / f"{name}.ready")]
    return ChildSpec(name, argv, stop_timeout_s=stop_timeout_s)


def poll(condition: object, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_caps_and_describes_exits() -> None:
    assert [Backoff().delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(3) == "exited with status 3"


def test_a_killed_child_is_logged_and_restarted_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lorapool")
    sup = Supervisor([sleeper("redis", tmp_path), sleeper("worker-1", tmp_path)], Backoff(0.1))
    try:
        for name in sup.children:
            sup.start(name)
        redis_pid, worker_pid = sup.children["redis"].pid, sup.children["worker-1"].pid
        assert worker_pid is not None
        os.kill(worker_pid, signal.SIGKILL)

        def restarted() -> bool:
            sup.check()
            return sup.children["worker-1"].restarts == 1

        poll(restarted, "the killed worker was not restarted")
        assert sup.children["worker-1"].pid not in (None, worker_pid)
        assert sup.children["redis"].pid == redis_pid and sup.children["redis"].restarts == 0
        died = [r.getMessage() for r in caplog.records if "SIGKILL" in r.getMessage()]
        assert died == [died[0]] and died[0].startswith(f"worker-1 (pid {worker_pid}) killed")
    finally:
        sup.stop()


def test_backoff_grows_while_a_child_keeps_dying_and_resets_after_uptime() -> None:
    clock = Clock()
    crash = ChildSpec("worker-1", [sys.executable, "-c", "raise SystemExit(3)"])
    sup = Supervisor([crash], Backoff(initial_s=1, cap_s=4, reset_after_s=60), clock)
    child = sup.children["worker-1"]
    sup.start("worker-1")
    delays = []
    for _ in range(4):
        assert child.proc is not None
        child.proc.wait(60)
        sup.check()  # notices the death, schedules the restart
        assert child.restart_at is not None
        delays.append(child.restart_at - clock.now)
        clock.now = child.restart_at
        sup.check()  # the backoff is over: started again
        assert child.restart_at is None
    assert delays == [1, 2, 4, 4]
    assert child.proc is not None
    child.proc.wait(60)
    clock.now += 60  # it stayed up a minute: the next death counts as the first
    sup.check()
    assert child.restart_at is not None and child.restart_at - clock.now == 1
    assert child.restarts == 4


def test_stop_goes_last_first_and_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    specs = [
        sleeper("redis", tmp_path),
        sleeper("stubborn", tmp_path, stop_timeout_s=1),
        sleeper("worker-1", tmp_path),
    ]
    sup = Supervisor(specs)
    for name in sup.children:
        sup.start(name)
    poll(lambda: all((tmp_path / f"{n}.ready").exists() for n in sup.children), "children")
    # Own process groups: a terminal's Ctrl-C reaches only the supervisor.
    for child in sup.children.values():
        assert child.pid is not None and os.getpgid(child.pid) == child.pid
    sup.stop()
    assert (tmp_path / "stopped").read_text().split() == ["worker-1", "redis"]
    codes = {n: c.proc.returncode for n, c in sup.children.items() if c.proc is not None}
    assert codes == {"worker-1": 0, "stubborn": -signal.SIGKILL, "redis": 0}
