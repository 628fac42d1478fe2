"""Stopping a local run cleanly. Ctrl-C, SIGTERM or SIGHUP on `rlhf run` stops every process the run
started (step processes, torchrun and its workers), marks the pipeline's MLflow runs KILLED and ends in one
line with exit code 130. A step whose `rlhf run` was killed outright (SIGKILL: nothing runs in it any more)
notices and stops itself and its own processes, so no training is left running with nobody to report to.

On Kubernetes none of this applies: KFP and the kubelet own the pods.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

import psutil

from rlhf_components.core.errors import UserError

log = logging.getLogger(__name__)

RUNNER_PID_ENV = "RLHF_RUNNER_PID"
PARENT_RUN_FILE_ENV = "RLHF_PARENT_RUN_FILE"  # start_run leaves the pipeline's MLflow run here
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
GRACE_S = 10.0  # for a step to record its failure and clean up before it is killed


class Interrupted(UserError):
    """The run was stopped by a signal: the CLI exits 130, as a shell does for Ctrl-C."""


@contextmanager
def stopped_cleanly(pipeline: str, run_file: Path) -> Iterator[None]:
    """Run a local pipeline so that an interrupt leaves no process behind and no MLflow run RUNNING; the
    step processes must run with `runner_environment(run_file)`."""
    previous = {number: signal.signal(number, _as_keyboard_interrupt) for number in STOP_SIGNALS}
    try:
        yield
    except KeyboardInterrupt:
        ignored = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, *STOP_SIGNALS)}
        try:
            stopped = stop_descendants(GRACE_S)
            marked = _mark_killed(run_file)
        finally:
            for number, handler in ignored.items():
                signal.signal(number, handler)
        where = f"; its MLflow run {marked} is marked KILLED" if marked else ""
        message = f"pipeline {pipeline} stopped, with the {stopped} processes it started{where}"
        raise Interrupted(message) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def runner_environment(run_file: Path) -> dict[str, str]:
    """What the step processes of a local run must inherit for `stop_with_the_runner` and
    `record_parent_run` to work."""
    return {RUNNER_PID_ENV: str(os.getpid()), PARENT_RUN_FILE_ENV: str(run_file)}


def _as_keyboard_interrupt(number: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(number).name)


def stop_descendants(grace_s: float) -> int:
    """SIGINT to every process below this one (Python steps then record their failure and clean up), then
    SIGKILL to whatever is left after `grace_s`; returns how many processes were stopped."""
    stopped: set[int] = set()
    for _ in range(3):  # a process may start another while we stop it
        children = psutil.Process().children(recursive=True)
        if not children:
            break
        for child in children:
            stopped.add(child.pid)
            with suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGINT)
        _, alive = psutil.wait_procs(children, timeout=grace_s)
        for child in alive:
            with suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(alive, timeout=5)
    return len(stopped)


def record_parent_run(tracking_uri: str, run_id: str) -> None:
    """In start_run: tell `rlhf run` which MLflow run to mark KILLED if it is interrupted."""
    target = os.environ.get(PARENT_RUN_FILE_ENV)
    if target:
        recorded = {"tracking_uri": tracking_uri, "run_id": run_id}
        Path(target).write_text(json.dumps(recorded), encoding="utf-8")


def _mark_killed(run_file: Path) -> str | None:
    """The pipeline run and its still-running step runs → KILLED; returns the pipeline run's id."""
    if not run_file.is_file():
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    recorded = json.loads(run_file.read_text(encoding="utf-8"))
    # On the way out: a tracking server that is down gets one quick try, not minutes of retries.
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    client = mlflow.MlflowClient(recorded["tracking_uri"])
    run_id: str = recorded["run_id"]
    try:
        parent = client.get_run(run_id)
        running = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'",
        )
        for run in [*running, parent]:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")
    except (MlflowException, OSError) as error:
        log.warning("could not mark MLflow run %s KILLED: %s", run_id, error)
        return None
    return run_id


def stop_with_the_runner() -> None:
    """In a step process of a local run: when `rlhf run` is gone, stop this step and what it started."""
    pid = os.environ.get(RUNNER_PID_ENV)
    if not pid:
        return
    try:
        runner = psutil.Process(int(pid))
    except (psutil.NoSuchProcess, ValueError):
        return
    threading.Thread(target=_watch, args=(runner,), name="rlhf-runner-watch", daemon=True).start()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_runner_gone = threading.Event()


def runner_gone() -> bool:
    """Whether this step process saw its `rlhf run` vanish (its failures are then the kill, not its own)."""
    return _runner_gone.is_set()


@contextmanager
def sigint_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _watch(runner: psutil.Process) -> None:
    while _alive(runner):
        time.sleep(1.0)
    _runner_gone.set()
    log.error("rlhf run (pid %d) is gone; stopping this step", runner.pid)
    stop_descendants(grace_s=5.0)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(GRACE_S)  # a main thread stuck in native code never sees the interrupt
    os._exit(130)
