"""`cornserve.runtime.supervise` with real processes: restart a dying child up to N times, then give up."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cornserve.runtime.process import ProcessGroup
from cornserve.runtime.supervise import supervise


@dataclass
class Service:
    name: str
    script: str
    log_path: Path
    starts: int = 0
    group: ProcessGroup | None = field(default=None, repr=False)

    def start(self) -> None:
        self.starts += 1
        self.group = ProcessGroup.spawn(
            [sys.executable, "-c", self.script], log_path=self.log_path, die_with_parent=True
        )

    def exit_code(self) -> int | None:
        assert self.group is not None
        return self.group.exit_code()

    def log_tail(self) -> str:
        assert self.group is not None
        return self.group.log_tail()


def test_a_dying_child_is_restarted_max_restarts_times_then_reported(tmp_path: Path) -> None:
    crasher = Service("crasher", "print('boom', flush=True); raise SystemExit(3)", tmp_path / "crasher.log")
    steady = Service("steady", "import time; time.sleep(600)", tmp_path / "steady.log")
    services = {s.name: s for s in (crasher, steady)}
    for s in services.values():
        s.start()
    said: list[str] = []
    deadline = time.monotonic() + 60
    try:
        code = supervise(
            list(services.values()),
            lambda name: services[name].start(),
            lambda: time.monotonic() > deadline,
            max_restarts=2,
            poll_s=0.05,
            say=said.append,
        )
    finally:
        assert steady.group is not None
        steady.group.stop(grace_s=5)
    assert code == 1
    assert crasher.starts == 3 and steady.starts == 1
    assert [line.split(";")[0] for line in said] == [
        "warning: crasher exited unexpectedly (code 3)",
        "warning: crasher exited unexpectedly (code 3)",
        "error: crasher exited (code 3) after 2 restart(s)",
    ]
    assert said[-1].endswith("Its log:\nboom\nboom\nboom")


def test_supervision_returns_zero_when_asked_to_stop(tmp_path: Path) -> None:
    steady = Service("steady", "import time; time.sleep(600)", tmp_path / "steady.log")
    steady.start()
    stop_at = time.monotonic() + 0.5
    try:
        assert supervise([steady], lambda _: None, lambda: time.monotonic() > stop_at, poll_s=0.05) == 0
        assert steady.starts == 1 and steady.exit_code() is None
    finally:
        assert steady.group is not None
        steady.group.stop(grace_s=5)
