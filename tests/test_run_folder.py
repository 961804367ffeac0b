"""The run folder (lock, no reuse of an earlier run), the atomic metrics rewrite and the stop request."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ekipl.metrics import MetricsLogger
from ekipl.run_folder import RunFolderError, RunLock, check_fresh_start, earlier_run
from ekipl.stop_request import StopRequest, launcher_ancestors


def test_a_second_job_cannot_lock_the_same_run_folder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderError, match=f"in use by another job \\(pid {os.getpid()}\\)"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit
        pass


def test_the_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ekipl.run_folder import RunLock; "
                               f"lock = RunLock(__import__('pathlib').Path({str(tmp_path)!r})); lock.acquire(); print(1, flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        with pytest.raises(RunFolderError):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire()


def test_resume_never_refuses_a_folder_holding_an_earlier_run(tmp_path):
    (tmp_path / "tiny_model").mkdir()  # caches are not a run
    check_fresh_start(tmp_path, "never")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    assert earlier_run(tmp_path) == ["checkpoints", "metrics.jsonl"]
    with pytest.raises(RunFolderError, match="holds an earlier run \\(checkpoints, metrics.jsonl\\).*run.resume=auto"):
        check_fresh_start(tmp_path, "never")
    check_fresh_start(tmp_path, "auto")


def test_the_metrics_rewrite_on_resume_never_leaves_a_torn_log(tmp_path, monkeypatch):
    logger = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 5):
        logger.log(step, {"reward/mean": float(step)})
    before = logger.path.read_text()
    real_open = pathlib.Path.open

    def killed_mid_write(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        if "w" in mode:
            handle.write = lambda data: (_ for _ in ()).throw(KeyboardInterrupt("killed"))
        return handle

    monkeypatch.setattr(pathlib.Path, "open", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        logger.truncate_after(2)
    monkeypatch.undo()
    assert logger.path.read_text() == before
    logger.truncate_after(2)
    assert [json.loads(line)["step"] for line in logger.path.read_text().splitlines()] == [1, 2]
    logger.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_requests_a_stop_instead_of_killing(signum):
    with StopRequest() as stop:
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
        assert stop.reason == signal.Signals(signum).name and stop.exit_code == 128 + signum
    assert signal.getsignal(signal.SIGTERM) is not stop._on_signal


def test_a_second_ctrl_c_interrupts_at_once():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert stop.reason == "SIGINT"


def test_the_death_of_a_launcher_above_requests_a_stop():
    # a stand-in 'deepspeed' launcher that starts a child and waits for it, as DeepSpeed's launch.py does
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print(child.pid, flush=True); child.wait()")
    launcher = subprocess.Popen([sys.executable, "-c", script, "deepspeed.launcher.launch"], stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())
    try:
        assert launcher_ancestors(child)[0] == launcher.pid
        stop = StopRequest(poll_s=0.05)
        watchdog = __import__("threading").Thread(target=stop._watch, args=([launcher.pid],), daemon=True)
        watchdog.start()
        time.sleep(0.2)
        assert stop.reason is None
        launcher.kill()
        launcher.wait()
        watchdog.join(timeout=5)
        assert stop.reason == f"the launcher process {launcher.pid} exited"
    finally:
        launcher.kill()
        os.kill(child, signal.SIGKILL)
    assert launcher_ancestors() == []  # pytest runs under no launcher
