"""The cached cogradctl steps (OUT/steps/KEY.json) and the processes and threads that run them."""

from __future__ import annotations

import itertools
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from .config import ROOT


class Runner:
    """``run(key, args)`` → the JSON a cogradctl command printed, recorded in OUT/steps/KEY.json and
    reused when the same command was recorded after its inputs were written; None when
    ``cached_only`` and not recorded."""

    def __init__(self, out: Path, in_process: bool = False, cached_only: bool = False, workers: int = 0) -> None:
        self.steps = out / "steps"
        self.steps.mkdir(parents=True, exist_ok=True)
        self.in_process, self.cached_only = in_process, cached_only
        # This checkout's code, the model plugins included: they are the package cogradctl_plugins,
        # which an editable install of another clone would otherwise provide.
        shim = out / "pythonpath"
        shim.mkdir(exist_ok=True)
        link = shim / "cogradctl_plugins"
        if link.is_symlink() and link.resolve() != (ROOT / "plugins").resolve():
            link.unlink()  # a study started from another checkout: point at this one's plugins
        if not link.exists():
            link.symlink_to(ROOT / "plugins", target_is_directory=True)
        path = [str(ROOT), str(shim.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
        if in_process:
            sys.path[:0] = path[:2]
        self.workers = None
        if workers and not in_process:
            # Long-lived worker processes: each imports torch and cogradctl once instead of once a step
            # (on the loaded 2-core machine a fresh interpreter took 20-30 s of a step's time).
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")
            self.workers = ProcessPoolExecutor(
                workers, context, initializer=_worker_init, initargs=(path[:2],), max_tasks_per_child=200
            )
        self.records: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.key_locks: dict[str, threading.Lock] = {}

    def __call__(self, key: str, args: list) -> dict | None:
        """One step at a time per key: a second caller waits, then reuses the first one's record."""
        with self.lock:
            key_lock = self.key_locks.setdefault(key, threading.Lock())
        with key_lock:
            return self._step(key, args)

    def _step(self, key: str, args: list) -> dict | None:
        args = [str(a) for a in args]
        text = shlex.join(["cogradctl", *args])
        path = self.steps / f"{key}.json"
        inputs = [Path(v) for f, v in zip(args, args[1:]) if f in ("--checkpoint", "--data", "--valid", "--source")]
        if path.exists():
            record = json.loads(path.read_text())
            fresh = all(p.exists() and (p.is_dir() or p.stat().st_mtime < record["started"]) for p in inputs)
            if record["command"] == text and fresh:
                return self._keep(key, {**record, "reused": True})
        if self.cached_only:
            return None
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
        started = time.time()
        code, stdout, stderr = self._execute(args)
        if code != 0:
            raise SystemExit(f"step {key} failed with exit code {code}: {text}\n{stderr[-2000:]}")
        record = {"key": key, "command": text, "seconds": round(time.time() - started, 2), "started": started}
        record["load"] = os.getloadavg()[0]  # the machine's 1-minute load average as the step ended
        record["result"] = json.loads(stdout)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
        return self._keep(key, record)

    def _keep(self, key: str, record: dict) -> dict:
        with self.lock:
            self.records[key] = record
        return record["result"]

    def _execute(self, args: list[str]) -> tuple[int, str, str]:
        if self.in_process:
            return _invoke(args)
        if self.workers is not None:
            return self.workers.submit(_invoke, args).result()
        proc = subprocess.run([sys.executable, "-m", "cogradctl", *args], capture_output=True, text=True, env=self.env)
        return proc.returncode, proc.stdout, proc.stderr


def _worker_init(path: list[str]) -> None:
    """A worker process: this checkout first on sys.path, one torch thread (set before torch loads)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    sys.path[:0] = path
    import torch

    torch.set_num_threads(1)


def _invoke(args: list[str]) -> tuple[int, str, str]:
    """``cogradctl ARGS`` in this process, through the CLI's own entry (click's test runner keeps
    stdout and stderr apart) → exit code, stdout, stderr."""
    from typer.testing import CliRunner

    from cogradctl import cli

    result = CliRunner().invoke(cli.app, args)
    return result.exit_code, result.stdout, result.stderr


class Pool:
    """``jobs`` worker threads taking the lowest (priority, submission order) job first, so the data
    sets listed first finish first; orchestrating threads wait on the futures, never a worker."""

    def __init__(self, jobs: int) -> None:
        self.queue: queue.PriorityQueue = queue.PriorityQueue()
        self.count = itertools.count()
        for _ in range(jobs):
            threading.Thread(target=self._work, daemon=True).start()

    def submit(self, priority: int, fn, *args) -> Future:
        future: Future = Future()
        self.queue.put((priority, next(self.count), fn, args, future))
        return future

    def _work(self) -> None:
        while True:
            _, _, fn, args, future = self.queue.get()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(exc)
