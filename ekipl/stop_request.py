"""Graceful stop: SIGTERM, SIGHUP and SIGINT, or the death of the launcher, end the run after the current step.

DeepSpeed's single-node launcher runs ``runner -> launch.py -> train.py``. Killing the top ``deepspeed``
process does not reach the ranks (the runner forwards no signal there), so a watchdog thread also
watches the launcher processes above this one and requests a stop when one disappears. The trainer
checks :attr:`StopRequest.reason` between steps (agreed over ranks), saves a checkpoint and exits.
A second SIGINT interrupts at once, as Ctrl-C is expected to.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
LAUNCHER_MARKERS = ("deepspeed", "torchrun", "torch.distributed.run", "torch/distributed/run")


def _parent_of(pid: int) -> Optional[int]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the comm field may hold spaces and parentheses


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_ancestors(pid: Optional[int] = None) -> list[int]:
    """The chain of launcher processes (deepspeed, torchrun) directly above ``pid`` (default: this one)."""
    chain = []
    parent = _parent_of(pid or os.getpid())
    while parent and parent > 1 and any(marker in _cmdline(parent) for marker in LAUNCHER_MARKERS):
        chain.append(parent)
        parent = _parent_of(parent)
    return chain


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopRequest:
    """Set by a signal or by the launcher's death; read by the training loop between steps."""

    def __init__(self, poll_s: float = 1.0) -> None:
        self.reason: Optional[str] = None
        self.signum: Optional[int] = None
        self._poll_s = poll_s
        self._previous: dict[int, object] = {}
        self._done = threading.Event()
        self._watchdog: Optional[threading.Thread] = None

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers only install there
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        launchers = launcher_ancestors()
        if launchers:
            self._watchdog = threading.Thread(target=self._watch, args=(launchers,), name="ekipl-launcher-watchdog",
                                              daemon=True)
            self._watchdog.start()
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._done.set()

    def request(self, reason: str, signum: int = signal.SIGTERM) -> None:
        if self.reason is None:
            self.reason, self.signum = reason, signum

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name, signum)

    def _watch(self, launchers: list[int]) -> None:
        while not self._done.wait(self._poll_s):
            gone = [pid for pid in launchers if not _alive(pid)]
            if gone:
                self.request(f"the launcher process {gone[0]} exited")
                return

    @property
    def exit_code(self) -> int:
        """The shell's convention for a run ended by a signal: 128 + its number."""
        return 128 + (self.signum or signal.SIGTERM)

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
