#!/usr/bin/env python3
"""The evidence study (issue #26): where CoGrad and the other gradient methods change a model's
test AUC beyond seed noise, and whether measuring transference first tells a user when.

Usage::

    python benchmarks/study.py --out /tmp/study-run [--source ../shared/datasets/census-kdd]
                               [--quick | --tiny] [--jobs 2] [--results docs/results.md]
    python benchmarks/study.py --out /tmp/study-run --report-only   # results from the finished steps

Every step is one ``cogradctl`` command, run through the CLI's entry by one of ``--jobs`` long-lived
worker processes, which import torch and cogradctl once (``--fresh-processes``: a new interpreter per
step; ``--in-process``: in this interpreter, for the test); every worker runs this checkout's code,
model plugins included. Its exact command and JSON output are kept in ``OUT/steps/KEY.json``;
a step whose record has the same command and whose inputs are older than the record is reused, so
an interrupted study resumes where it stopped. Up to ``--jobs`` steps run at a time (each with one
torch thread), the data sets in the order listed below (the first finish first).

Data sets:

* ``syn±ρ``: the MMoE paper's synthetic construction (``cogradctl sample-data``, anchor task ``a``
  and task ``b`` at relatedness ρ, both 30 % positive) for ρ in {−0.5, 0, 0.5, 0.9}. ``sample-data
  --seed 0`` gives train and valid; ``--seed 1`` gives the fine-tuning data (its train file: rows the
  base never saw, same distribution) and test (its valid file).
* ``census-g1``, ``census-g2``, ``census-all``: ``cogradctl data prepare census-kdd --group 1|2|all``
  (income+marital, education+marital, the three). For ``finetune`` the training split is cut in two
  random halves (seed 0): the base learns on the first from scratch, is fine-tuned on the second
  (docs/results-census.md fine-tunes a converged base under a decaying learning rate instead).

Protocols (per data set, every seed s):

* ``scratch``: ``init --seed s``, then ``train --method M --seed s`` for the whole schedule (warmup,
  cosine decay), as the MTL literature and LibMTL do.
* ``finetune``: the product's use. The base is an ``ew`` model trained from scratch with the same
  seed (synthetic: the scratch protocol's); it is fine-tuned on rows it never saw with a constant
  learning rate (room to act).

Methods: ew, cograd, gdod, pcgrad, mgda, cagrad, nash-mtl, uw at their defaults, except CoGrad,
whose strength γ is chosen per data set and protocol within a declared grid by the seed-0 run's
mean validation AUC at its last step (``hessian=diag normalize=relative`` given explicitly). The
single-task references are the same model built with one task (``init --tasks T``) trained with the
same schedule (and, for ``finetune``, fine-tuned the same way from its own scratch model).

Every run's ``last.safetensors`` is scored once on test (``evaluate --json``); the validation AUCs
are the ones ``train`` reports at its last step. Nothing reads test to choose anything.

Outputs (``--results``, default docs/results.md; the figure beside it):

* per data set and protocol: per-task test AUC (mean ± sd over seeds), Δm% (LibMTL: the mean over
  tasks of (M_t − M_single,t) / M_single,t × 100, AUC higher is better), and each method − ew as a
  paired difference over seeds with a 95 % t interval and a verdict: better / worse only when the
  interval excludes 0, otherwise "no detectable difference";
* "does measurement predict the outcome": ``measure-transference`` on the seed-0 ``ew`` model (the
  base of ``finetune``) on validation — the transference ratio (what a step on one task does to the
  other's loss, as a fraction of what it does to its own), gradient cosine and conflict rate — beside
  every method's Δm% gain, and one PNG figure (needs matplotlib, the ``plot`` extra);
* CoGrad's Hessian isolated: on a small MMoE, ``hessian=exact`` (true Hessian-vector products),
  ``diag``, ``fisher-ema`` and ``outer`` at the same strengths, paired against ``ew`` on validation
  and on test;
* CoGrad's defaults: which γ the validation grid chose where, and the Hessian study's validation
  differences, from which a default change would follow;
* the setup, the exact commands, the machine and the time each step took. A study stopped early
  gives a file marked PARTIAL that lists the missing cells.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import queue
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

METHODS = ["ew", "cograd", "gdod", "pcgrad", "mgda", "cagrad", "nash-mtl", "uw"]
COGRAD_FIXED = ["-o", "hessian=diag", "-o", "normalize=relative"]
ROOT = Path(__file__).resolve().parent.parent
SMALL_MMOE = {"num_experts": 2, "expert": [16], "tower": [8]}

FULL = {
    "seeds": [0, 1, 2, 3, 4],
    "methods": METHODS,
    "cograd_grid": [0.03, 0.1, 0.3],
    "rhos": [0.0, -0.5, 0.9, 0.5],
    "syn": {"rows": 12000, "valid": 6000, "ft_rows": 6000, "test": 6000, "model": {}},
    "scratch": {"epochs": 4, "batch": 256, "lr": 2e-3, "warmup": 20},
    "finetune": {"epochs": 2, "batch": 256, "lr": 1e-3},
    "census": {
        "groups": ["1", "2", "all"],
        **{"epochs": 1, "batch": 1024, "lr": 2e-3, "warmup": 50},
        "finetune": {"epochs": 1, "batch": 1024, "lr": 5e-4},
    },
    "hessian": {"rho": 0.0, "gammas": [0.1, 0.5], "kinds": ["exact", "diag", "fisher-ema", "outer"]},
    "measure": {"batches": 10, "batch": 512},
}
QUICK = {
    **FULL,
    "seeds": [0, 1, 2],
    "methods": ["ew", "cograd", "pcgrad", "mgda"],
    "cograd_grid": [0.1, 0.3],
    "rhos": [0.0],
    "syn": {**FULL["syn"], "rows": 6000, "valid": 3000, "ft_rows": 3000, "test": 3000},
    "scratch": {**FULL["scratch"], "epochs": 2},
    "finetune": {**FULL["finetune"], "epochs": 1},
    "census": None,
    "hessian": {**FULL["hessian"], "gammas": [0.1]},
}
TINY = {
    **QUICK,
    "seeds": [0, 1],
    "methods": ["ew", "cograd"],
    "cograd_grid": [0.1, 0.3],
    "syn": {"rows": 600, "valid": 600, "ft_rows": 300, "test": 600, "model": SMALL_MMOE},
    "scratch": {"epochs": 1, "batch": 128, "lr": 2e-3, "warmup": 1},
    "finetune": {"epochs": 1, "batch": 128, "lr": 1e-3},
    "hessian": {"rho": 0.0, "gammas": [0.1], "kinds": ["exact", "diag"]},
    "measure": {"batches": 2, "batch": 256},
}
# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
T975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


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
        if not (shim / "cogradctl_plugins").exists():
            (shim / "cogradctl_plugins").symlink_to(ROOT / "plugins", target_is_directory=True)
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


# ---------------------------------------------------------------- steps


class Study:
    def __init__(self, args, cfg: dict) -> None:
        self.cfg, self.out = cfg, Path(args.out)
        workers = 0 if args.fresh_processes else max(1, args.jobs)
        self.run = Runner(self.out, args.in_process, args.report_only, workers)
        self.pool = Pool(1 if args.in_process else max(1, args.jobs))
        self.source = args.source

    def model_options(self, model: dict) -> list:
        return [x for k, v in model.items() for x in ("--config", f"{k}={json.dumps(v, separators=(',', ':'))}")]

    def init(self, key: str, data: Path, tasks: list[str], seed: int, model: dict) -> Path | None:
        path = self.out / "ckpt" / f"{key}.safetensors"
        args = ["init", "--model", "mmoe", "--data", data, "--tasks", ",".join(tasks), *self.model_options(model)]
        ok = self.run(key, [*args, "--out", path, "--seed", seed, "--overwrite", "--json"])
        return path if ok is not None else None

    def train_eval(self, key: str, ckpt: Path | None, data: dict, train: Path, method: list, seed: int, sched: dict):
        """Train (validation at the last step from train's JSON), then evaluate last.safetensors on test."""
        if ckpt is None:
            return None
        out = self.out / "runs" / key
        if "warmup" in sched:
            schedule = ["--schedule", "cosine", "--warmup-steps", sched["warmup"]]
        else:
            schedule = ["--schedule", "constant"]
        args = ["train", "--checkpoint", ckpt, "--data", train, "--valid", data["valid"], "--out", out, *method]
        args += ["--epochs", sched["epochs"], "--batch-size", sched["batch"], "--lr", sched["lr"], *schedule]
        result = self.run(key, [*args, "--seed", seed, "--overwrite", "--json", "-q"])
        if result is None:
            return None
        test = self.run(
            f"{key}-test",
            ["evaluate", "--checkpoint", out / "last.safetensors", "--data", data["test"], "--json", "-q"],
        )
        if test is None:
            return None
        valid = {t: v["auc"] for t, v in result["after"]["tasks"].items()}
        return {"valid": valid, "test": {t: v["auc"] for t, v in test["tasks"].items()}, "dir": str(out)}

    def step(self, priority: int, key: str, args: list):
        """One step through the pool (the data steps too, so that at most --jobs run at a time)."""
        return self.pool.submit(priority, self.run, key, args).result()

    def synthetic(self, rho: float, priority: int, prefix: str = "syn") -> dict:
        name, c = f"{prefix}{rho:+g}", self.cfg["syn"]
        d = self.out / "data" / name
        common = ["sample-data", "--tasks", f"a=1:0.3,b={rho:g}:0.3", "--json"]
        self.step(
            priority, f"{name}-data", [*common, "--out", d / "base", "--rows", c["rows"], "--valid-rows", c["valid"]]
        )
        args = [*common, "--out", d / "new", "--rows", c["ft_rows"], "--valid-rows", c["test"], "--seed", 1]
        self.step(priority, f"{name}-data2", args)
        data = {"train": d / "base/train.parquet", "valid": d / "base/valid.parquet", "test": d / "new/valid.parquet"}
        data["ft"] = d / "new/train.parquet"
        return {"name": name, "kind": "synthetic", "rho": rho, "tasks": ["a", "b"], "data": data, "model": c["model"]}

    def census(self, group: str, priority: int) -> dict:
        name = f"census-{'g' + group if group != 'all' else 'all'}"
        d = self.out / "data" / name
        args = ["data", "prepare", "census-kdd", "--source", self.source, "--out", d, "--group", group]
        prep = self.step(priority, f"{name}-data", [*args, "--overwrite", "--json"])
        data = {s: d / f"{s}.parquet" for s in ("train", "valid", "test")}
        tasks = prep["labels"] if prep else []
        return {"name": name, "kind": "census", "group": group, "tasks": tasks, "data": data, "model": {}}

    def dataset(self, ds: dict, priority: int) -> dict:
        """Both protocols (census: scratch only) of one data set; returns its part of the report."""
        cfg, seeds, data, name = self.cfg, self.cfg["seeds"], ds["data"], ds["name"]
        sched = cfg["scratch"] if ds["kind"] == "synthetic" else cfg["census"]
        sub = lambda fn, *a: self.pool.submit(priority, fn, *a)  # noqa: E731
        inits = {s: sub(self.init, f"{name}-init-s{s}", data["train"], ds["tasks"], s, ds["model"]) for s in seeds}
        singles = {
            (t, s): sub(self.init, f"{name}-init-{t}-s{s}", data["train"], [t], s, ds["model"])
            for t in ds["tasks"]
            for s in seeds
        }
        protocols = {"scratch": {"sched": sched, "train": data["train"], "start": inits, "single_start": singles}}
        report = {**{k: v for k, v in ds.items() if k != "data"}, "protocols": {}}
        report["protocols"]["scratch"] = self.protocol(ds, "scratch", protocols["scratch"], sub)
        if ds["kind"] == "synthetic":
            scratch = report["protocols"]["scratch"]
            base = {s: _path(scratch["runs"].get("ew", {}).get(s)) for s in seeds}
            sbase = {(t, s): _path(scratch["single"].get(t, {}).get(s)) for t in ds["tasks"] for s in seeds}
            spec = {"sched": cfg["finetune"], "train": data["ft"], "start": base, "single_start": sbase}
            report["protocols"]["finetune"] = self.protocol(ds, "finetune", spec, sub)
        halves = self.halves(ds) if ds["kind"] == "census" and cfg["census"].get("finetune") else None
        if halves:
            base = self.half_bases(ds, halves[0], inits, singles, sub)
            spec = {"sched": cfg["census"]["finetune"], "train": halves[1], **base}
            report["protocols"]["finetune"] = self.protocol(ds, "finetune", spec, sub)
        ew0 = report["protocols"]["scratch"]["runs"].get("ew", {}).get(seeds[0])
        if ew0:
            m = cfg["measure"]
            args = ["measure-transference", "--checkpoint", Path(ew0["dir"]) / "last.safetensors"]
            args += ["--data", data["valid"], "--batches", m["batches"], "--batch-size", m["batch"], "--seed", 0]
            report["measure"] = self.step(priority, f"{name}-measure", [*args, "--json", "-q"])
        return report

    def halves(self, ds: dict) -> tuple[Path, Path] | None:
        """The census training split cut in two halves at random (seed 0; rows keep their order):
        the finetune protocol's base learns on the first, is fine-tuned on the second."""
        src = ds["data"]["train"]
        d = self.out / "data" / ds["name"]
        h1, h2 = d / "half1.parquet", d / "half2.parquet"
        if not src.exists():
            return None
        if not (h2.exists() and h2.stat().st_mtime > src.stat().st_mtime):
            import numpy as np
            import pyarrow.parquet as pq

            d.mkdir(parents=True, exist_ok=True)
            table = pq.read_table(src)
            perm = np.random.default_rng(0).permutation(table.num_rows)
            for path, rows in ((h1, perm[: len(perm) // 2]), (h2, perm[len(perm) // 2 :])):
                pq.write_table(table.take(np.sort(rows)), path.with_suffix(".tmp"), row_group_size=4096)
                os.replace(path.with_suffix(".tmp"), path)
        return h1, h2

    def half_bases(self, ds: dict, half: Path, inits: dict, singles: dict, sub) -> dict:
        """The census finetune protocol's bases: ew (and each single-task model) from scratch on the
        first half, with the scratch schedule; → the protocol's start checkpoints."""
        name, sched, seeds = ds["name"], self.cfg["census"], self.cfg["seeds"]
        ew = ["--method", "ew"]
        base = {
            s: sub(self.train_eval, f"{name}-half-ew-s{s}", _result(inits[s]), ds["data"], half, ew, s, sched)
            for s in seeds
        }
        single = {
            (t, s): sub(self.train_eval, f"{name}-half-single-{t}-s{s}", _result(f), ds["data"], half, ew, s, sched)
            for (t, s), f in singles.items()
        }
        return {
            "start": {s: _path(_result(f)) for s, f in base.items()},
            "single_start": {k: _path(_result(f)) for k, f in single.items()},
        }

    def protocol(self, ds: dict, proto: str, spec: dict, sub) -> dict:
        """Every method (CoGrad after its γ grid), the single-task models; futures resolved here."""
        seeds, name, sched = self.cfg["seeds"], f"{ds['name']}-{proto}", spec["sched"]
        start = {s: _result(f) for s, f in spec["start"].items()}

        def go(method: str, seed: int, options: list):
            return sub(
                self.train_eval,
                f"{name}-{method}-s{seed}",
                start[seed],
                ds["data"],
                spec["train"],
                options,
                seed,
                sched,
            )

        grid = {
            g: go(f"cograd-g{g:g}", seeds[0], ["--method", "cograd", *COGRAD_FIXED, "--gamma", g])
            for g in self.cfg["cograd_grid"]
        }
        futures = {m: {s: go(m, s, ["--method", m]) for s in seeds} for m in self.cfg["methods"] if m != "cograd"}
        single = {}
        for t in ds["tasks"]:
            for s in seeds:
                st = _result(spec["single_start"][(t, s)])
                key = f"{name}-single-{t}-s{s}"
                single.setdefault(t, {})[s] = sub(
                    self.train_eval, key, st, ds["data"], spec["train"], ["--method", "ew"], s, sched
                )
        grid = {g: _result(f) for g, f in grid.items()}
        scores = {g: statistics.fmean(r["valid"].values()) for g, r in grid.items() if r}
        out = {"grid": scores, "runs": {}, "single": {}}
        if "cograd" in self.cfg["methods"] and len(scores) == len(grid):
            gamma = max(scores, key=lambda g: (scores[g], -abs(math.log(g / 0.1))))
            out["gamma"] = gamma
            futures["cograd"] = {
                s: go(f"cograd-g{gamma:g}", s, ["--method", "cograd", *COGRAD_FIXED, "--gamma", gamma]) for s in seeds
            }
        order = [m for m in self.cfg["methods"] if m in futures]
        for m in order:
            out["runs"][m] = {s: r for s, f in futures[m].items() if (r := _result(f))}
        out["single"] = {t: {s: r for s, f in fs.items() if (r := _result(f))} for t, fs in single.items()}
        return out

    def hessian(self, priority: int) -> dict:
        """CoGrad's Hessian approximations against each other and ew on a small MMoE (scratch)."""
        h, seeds = self.cfg["hessian"], self.cfg["seeds"]
        ds = self.synthetic(h["rho"], priority)  # the same data (and steps) as the syn data set at this ρ
        name, sub = "hess" + ds["name"][3:], lambda fn, *a: self.pool.submit(priority, fn, *a)  # noqa: E731
        inits = {s: sub(self.init, f"{name}-init-s{s}", ds["data"]["train"], ds["tasks"], s, SMALL_MMOE) for s in seeds}
        inits = {s: _result(f) for s, f in inits.items()}
        variants = {"ew": ["--method", "ew"]}
        for kind, gamma in itertools.product(h["kinds"], h["gammas"]):
            variants[f"{kind}-g{gamma:g}"] = [
                "--method",
                "cograd",
                "-o",
                f"hessian={kind}",
                "-o",
                "normalize=relative",
                "--gamma",
                gamma,
            ]
        futures = {
            v: {
                s: sub(
                    self.train_eval,
                    f"{name}-{v}-s{s}",
                    inits[s],
                    ds["data"],
                    ds["data"]["train"],
                    o,
                    s,
                    self.cfg["scratch"],
                )
                for s in seeds
            }
            for v, o in variants.items()
        }
        runs = {v: {s: r for s, f in fs.items() if (r := _result(f))} for v, fs in futures.items()}
        return {"rho": h["rho"], "model": SMALL_MMOE, "runs": runs, "tasks": ds["tasks"]}


def _result(future):
    return future.result() if isinstance(future, Future) else future


def _path(run: dict | None):
    return Path(run["dir"]) / "last.safetensors" if run else None


def run_study(args, cfg: dict) -> dict:
    """Every data set in its own orchestrating thread; the report is filled as they finish."""
    study = Study(args, cfg)
    started = time.time()
    # The order is the priority: ρ = 0 and the Hessian study first, census last.
    jobs = [("synthetic", rho) for rho in cfg["rhos"]]
    jobs.insert(1, ("hessian", None))
    if cfg["census"] and args.source:
        jobs += [("census", g) for g in cfg["census"]["groups"]]
    report = {"datasets": {}, "hessian": None, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    errors: list[BaseException] = []

    def one(i: int, kind: str, arg) -> None:
        try:
            if kind == "hessian":
                report["hessian"] = study.hessian(i)
                return
            ds = study.synthetic(arg, i) if kind == "synthetic" else study.census(arg, i)
            report["datasets"][ds["name"]] = study.dataset(ds, i)
        except BaseException as exc:  # noqa: BLE001 - raised after the others finish
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, k, a)) for i, (k, a) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    report["order"] = [f"syn{r:+g}" for r in cfg["rhos"]] + [
        f"census-{'g' + g if g != 'all' else 'all'}" for g in (cfg["census"] or {}).get("groups", []) if args.source
    ]
    report["seconds"] = time.time() - started
    report["records"] = study.run.records
    return report


# ---------------------------------------------------------------- statistics


def paired(a: dict, b: dict) -> dict | None:
    """a − b over the seeds both have: mean, 95 % t interval, verdict (None under 2 seeds)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if len(d) < 2:
        return None
    mean = statistics.fmean(d)
    half = (T975[len(d) - 2] if len(d) <= 31 else 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    lo, hi = mean - half, mean + half
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "no detectable difference"
    return {"n": len(d), "mean": mean, "lo": lo, "hi": hi, "verdict": verdict}


def mean_sd(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def delta_m(test: dict, single: dict) -> float:
    """LibMTL's Δm% for AUC (higher is better): mean over tasks of (M_t − S_t) / S_t × 100."""
    return statistics.fmean((test[t] - single[t]) / single[t] * 100 for t in single)


def summarize(proto: dict, tasks: list[str]) -> dict:
    """Per method: seeds done, per-task test AUC, Δm% per seed (None without every single-task
    model), mean AUC per seed, and the paired differences against ew."""
    complete = all(proto["single"].get(t) for t in tasks)
    ref = {t: mean_sd(r["test"][t] for r in proto["single"][t].values())[0] for t in tasks} if complete else None
    rows = {}
    for m, runs in proto["runs"].items():
        if not runs:
            continue
        rows[m] = {
            "n": len(runs),
            "auc": {t: mean_sd(r["test"][t] for r in runs.values()) for t in tasks},
            "valid": mean_sd(statistics.fmean(r["valid"][t] for t in tasks) for r in runs.values()),
            "mean": {s: statistics.fmean(r["test"][t] for t in tasks) for s, r in runs.items()},
            "dm": {s: delta_m(r["test"], ref) for s, r in runs.items()} if ref else None,
        }
    ew = rows.get("ew")
    for row in rows.values():
        row["vs_ew_dm"] = paired(row["dm"], ew["dm"]) if ew and row["dm"] and ew["dm"] else None
        row["vs_ew_auc"] = paired(row["mean"], ew["mean"]) if ew else None
    return {"ref": ref, "rows": rows}


def measured(m: dict) -> dict:
    """Off-diagonal means: transference ratio Z_rel[i][j] / Z_rel[i][i], cosine, conflict rate."""
    z, k = m["transference_rel"], len(m["tasks"])
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    ratio = [z[i][j] / z[i][i] for i, j in pairs if z[i][i]]
    return {
        "ratio": statistics.fmean(ratio) if ratio else float("nan"),
        "cosine": statistics.fmean(m["cosine"][i][j] for i, j in pairs),
        "conflict": statistics.fmean(m["conflict_rate"][i][j] for i, j in pairs),
    }


def spearman_p(x: list[float], y: list[float]) -> float | None:
    """Two-sided permutation p-value of Spearman's ρ: the share of orderings of y whose |ρ| reaches
    the observed one (every ordering up to 8 points, else 20 000 drawn with a fixed seed)."""
    observed = spearman(x, y)
    if observed is None:
        return None
    import random

    if len(y) <= 8:
        perms = itertools.permutations(y)
    else:
        rng = random.Random(0)
        perms = (rng.sample(y, len(y)) for _ in range(20000))
    hits = total = 0
    for perm in perms:
        r = spearman(x, list(perm))
        hits += r is not None and abs(r) >= abs(observed) - 1e-12
        total += 1
    return hits / total


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None under 3 points."""
    if len(x) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for _, group in itertools.groupby(order, key=lambda i: v[i]):
            group = list(group)
            for i in group:
                r[i] = statistics.fmean(order.index(g) for g in group) + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else None


# ---------------------------------------------------------------- results


def fmt_pair(p: dict | None, digits: int = 4) -> str:
    if not p:
        return "–"
    return f"{p['mean']:+.{digits}f} [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}]"


def cells(report: dict, cfg: dict) -> list[tuple[str, str, dict, dict]]:
    """(data set, protocol, its raw report, its summary) in the study's order."""
    out = []
    for name in report["order"]:
        ds = report["datasets"].get(name)
        for proto, p in (ds or {}).get("protocols", {}).items():
            out.append((name, proto, p, summarize(p, ds["tasks"])))
    return out


def missing(report: dict, cfg: dict) -> list[str]:
    """The cells (data set / protocol / method: seeds) the configuration asks for and the report lacks."""
    seeds, lost = set(cfg["seeds"]), []
    for name in report["order"]:
        ds = report["datasets"].get(name)
        census_ft = (cfg["census"] or {}).get("finetune")
        protos = ["scratch", "finetune"] if name.startswith("syn") or census_ft else ["scratch"]
        for proto in protos:
            p = (ds or {}).get("protocols", {}).get(proto, {"runs": {}, "single": {}})
            want = {m: p["runs"].get(m, {}) for m in cfg["methods"]}
            want.update({f"single-{t}": p["single"].get(t, {}) for t in (ds or {}).get("tasks", ["?"])})
            for m, runs in want.items():
                if seeds - set(runs):
                    lost.append(f"{name}/{proto}/{m} (seeds {', '.join(map(str, sorted(seeds - set(runs))))})")
        if ds is None or not ds.get("measure"):
            lost.append(f"{name}/measure-transference")
    h = report.get("hessian") or {"runs": {}}
    for v in ["ew", *(f"{k}-g{g:g}" for k in cfg["hessian"]["kinds"] for g in cfg["hessian"]["gammas"])]:
        if seeds - set(h["runs"].get(v, {})):
            lost.append(f"hessian/{v}")
    return lost


def results_table(tasks: list[str], summary: dict, proto: dict) -> list[str]:
    if not summary["rows"]:
        return ["Not run yet (listed under Missing)."]
    L = [
        "| method | seeds | " + " | ".join(f"test AUC {t}" for t in tasks) + " | Δm% | Δm% − ew [95% CI] | verdict | "
        "mean test AUC − ew [95% CI] | mean valid AUC |",
        "|---" * (len(tasks) + 7) + "|",
    ]
    for m, r in summary["rows"].items():
        label = f"cograd (γ={proto['gamma']:g})" if m == "cograd" and "gamma" in proto else m
        dm = f"{mean_sd(r['dm'].values())[0]:+.3f} ± {mean_sd(r['dm'].values())[1]:.3f}" if r["dm"] else "–"
        p = r["vs_ew_dm"] if r["dm"] else r["vs_ew_auc"]
        verdict = "(reference)" if m == "ew" else (p["verdict"] if p else "–")
        auc = " | ".join(f"{r['auc'][t][0]:.4f} ± {r['auc'][t][1]:.4f}" for t in tasks)
        pair_dm = "(reference)" if m == "ew" else fmt_pair(r["vs_ew_dm"])
        pair_auc = "(reference)" if m == "ew" else fmt_pair(r["vs_ew_auc"], 4)
        L.append(
            f"| {label} | {r['n']} | {auc} | {dm} | {pair_dm} | {verdict} | {pair_auc} | {r['valid'][0]:.4f} ± {r['valid'][1]:.4f} |"
        )
    ref = summary["ref"]
    if ref:
        L += [
            "",
            "Single-task models (test AUC, mean over seeds): " + ", ".join(f"{t} {ref[t]:.4f}" for t in tasks) + ".",
        ]
    else:
        L += ["", "Single-task models incomplete: Δm% not computed; the verdict uses the mean test AUC difference."]
    if proto.get("grid"):
        chosen = proto.get("gamma")
        grid = ", ".join(
            f"γ={g:g}: {v:.5f}{' (kept)' if g == chosen else ''}" for g, v in sorted(proto["grid"].items())
        )
        L += ["", f"CoGrad's γ grid (seed-0 mean validation AUC at the last step): {grid}."]
    return L


def prediction_rows(report: dict, cfg: dict) -> list[dict]:
    """Per data set and protocol: the ew model's measurement beside each method's Δm% gain over ew."""
    rows = []
    for name, proto, _p, summary in cells(report, cfg):
        meas = report["datasets"][name].get("measure")
        if not meas:
            continue
        gains = {m: r["vs_ew_dm"] for m, r in summary["rows"].items() if m != "ew" and r["vs_ew_dm"]}
        rows.append({"name": name, "proto": proto, **measured(meas), "gains": gains})
    return rows


def prediction_section(report: dict, cfg: dict, figure: str | None) -> list[str]:
    rows = prediction_rows(report, cfg)
    methods = [m for m in cfg["methods"] if m != "ew"]
    mark = {"better": " ▲", "worse": " ▼", "no detectable difference": ""}
    L = [
        "## Does measurement predict the outcome?",
        "",
        "Measured once per data set on the seed-0 `ew` model of the scratch protocol (on the synthetic data also the "
        "base the finetune protocol starts from; on census that base is the same recipe on half the rows), on validation: `measure-transference --json`. *ratio*: the mean over task "
        "pairs of Z_rel[i→j] / Z_rel[i→i] (what a lookahead step on task i does to task j's loss, as a fraction of "
        "what it does to i's own); *cos*: the mean gradient cosine; *conflict*: the share of batches with a negative "
        "cosine. Each method column: its Δm% − ew (mean over seeds; ▲ better / ▼ worse beyond the 95 % interval, "
        "unmarked: no detectable difference).",
        "",
        "| data set | protocol | ratio | cos | conflict | " + " | ".join(methods) + " |",
        "|---" * (5 + len(methods)) + "|",
    ]
    for r in rows:
        g = [
            f"{r['gains'][m]['mean']:+.4f}{mark[r['gains'][m]['verdict']]}" if m in r["gains"] else "–" for m in methods
        ]
        L.append(
            f"| {r['name']} | {r['proto']} | {r['ratio']:+.3f} | {r['cosine']:+.3f} | {r['conflict']:.2f} | "
            + " | ".join(g)
            + " |"
        )
    for key, label in (("ratio", "transference ratio"), ("cosine", "gradient cosine")):
        pts = [(r[key], r["gains"]["cograd"]["mean"]) for r in rows if "cograd" in r["gains"]]
        rho = spearman([a for a, _ in pts], [b for _, b in pts])
        pval = spearman_p([a for a, _ in pts], [b for _, b in pts]) if rho is not None else None
        spread = [abs(g["mean"]) for r in rows for g in r["gains"].values()]
        L += [
            "",
            f"Spearman rank correlation between the {label} and CoGrad's gain over {len(pts)} cells: "
            + (
                f"{rho:+.2f} (permutation p = {pval:.2f}; the two protocols of a data set share one measurement, so "
                "the cells are not independent and p is optimistic)"
                if rho is not None
                else "not computed (under 3 cells)"
            )
            + (f" (the largest |gain| of any method is {max(spread):.3f} Δm%)." if spread else "."),
        ]
    if figure:
        L += ["", f"![gain against measurement]({figure})", ""]
    return L


def figure(report: dict, cfg: dict, path: Path) -> bool:
    """Two panels: CoGrad's Δm% gain (95 % interval) and every other method's against the measured
    transference ratio. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = prediction_rows(report, cfg)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        g = r["gains"].get("cograd")
        if g:
            marker = "o" if r["proto"] == "scratch" else "s"
            left.errorbar(
                r["ratio"], g["mean"], yerr=[[g["mean"] - g["lo"]], [g["hi"] - g["mean"]]], fmt=marker, capsize=3
            )
            left.annotate(
                f"{r['name']} {r['proto'][0]}",
                (r["ratio"], g["mean"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    colors = dict(zip([m for m in cfg["methods"] if m not in ("ew", "cograd")], plt.cm.tab10.colors))
    for m, color in colors.items():
        pts = [(r["ratio"], r["gains"][m]["mean"]) for r in rows if m in r["gains"]]
        if pts:
            right.scatter(*zip(*pts), color=color, label=m, s=18)
    for ax in (left, right):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("transference ratio of the ew model (measured first)")
    left.set_ylabel("Δm% − ew (test)")
    right.set_ylabel("Δm% − ew (test)")
    left.set_title("CoGrad (o scratch, □ finetune; bars: 95 % CI)")
    right.set_title("the other methods (mean over seeds)")
    if colors:
        right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def hessian_section(report: dict, cfg: dict) -> list[str]:
    h = report.get("hessian")
    runs = {v: rs for v, rs in (h or {"runs": {}})["runs"].items() if rs}
    if "ew" not in runs:
        return ["## CoGrad's Hessian, isolated", "", "Not run yet.", ""]
    tasks = h["tasks"]
    mean = {
        v: {s: {sp: statistics.fmean(r[sp][t] for t in tasks) for sp in ("valid", "test")} for s, r in rs.items()}
        for v, rs in runs.items()
    }
    L = [
        "## CoGrad's Hessian, isolated",
        "",
        f"Synthetic data at ρ = {h['rho']:g}, a small MMoE ({json.dumps(h['model'])}), the scratch schedule, "
        "`normalize=relative`; every approximation at the same strengths. Mean AUC over the tasks, paired against "
        "`ew` over the seeds (95 % t interval). Validation is what a default may be chosen on; test is shown beside it.",
        "",
        "| variant | seeds | valid mean AUC | valid − ew [95% CI] | verdict (valid) | test − ew [95% CI] | verdict (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, per in mean.items():
        pv = paired({s: x["valid"] for s, x in per.items()}, {s: x["valid"] for s, x in mean["ew"].items()})
        pt = paired({s: x["test"] for s, x in per.items()}, {s: x["test"] for s, x in mean["ew"].items()})
        valid = mean_sd(x["valid"] for x in per.values())
        ref = v == "ew"
        L.append(
            f"| {'ew' if ref else 'cograd ' + v} | {len(per)} | {valid[0]:.4f} ± {valid[1]:.4f} | "
            + (
                " (reference) | | (reference) | |"
                if ref
                else f"{fmt_pair(pv, 4)} | {pv['verdict'] if pv else '–'} | {fmt_pair(pt, 4)} | {pt['verdict'] if pt else '–'} |"
            )
        )
    return [*L, ""]


def hessian_conclusion(report: dict) -> list[str]:
    """One line: the Hessian study's verdicts on validation, per approximation and strength."""
    h = report.get("hessian") or {"runs": {}}
    runs = {v: rs for v, rs in h["runs"].items() if rs}
    if "ew" not in runs or len(runs) < 2:
        return []
    tasks = h["tasks"]
    ew = {s: statistics.fmean(r["valid"][t] for t in tasks) for s, r in runs["ew"].items()}
    parts = []
    for v, rs in runs.items():
        p = (
            paired({s: statistics.fmean(r["valid"][t] for t in tasks) for s, r in rs.items()}, ew)
            if v != "ew"
            else None
        )
        if p:
            parts.append(f"{v} {p['verdict']} ({fmt_pair(p, 4)})")
    return [
        f"- CoGrad's Hessian isolated (small MMoE, ρ = {h['rho']:g}; mean validation AUC − ew, by approximation and "
        "γ): " + "; ".join(parts) + "."
    ]


def defaults_section(report: dict, cfg: dict) -> list[str]:
    chosen = [(n, pr, p.get("gamma")) for n, pr, p, _ in cells(report, cfg) if p.get("gamma") is not None]
    counts = {g: sum(1 for *_, c in chosen if c == g) for g in cfg["cograd_grid"]}
    spreads = [max(p["grid"].values()) - min(p["grid"].values()) for *_, p, _ in cells(report, cfg) if p.get("grid")]
    L = [
        "## CoGrad's defaults (validation only)",
        "",
        "The library default is γ = 0.1, `hessian=diag`, `normalize=relative`. The γ the validation grid kept, per cell: "
        + ("; ".join(f"{n}/{pr}: {g:g}" for n, pr, g in chosen) or "none yet")
        + ". Times each γ was kept: "
        + ", ".join(f"{g:g}: {c}" for g, c in counts.items())
        + ". Within a cell the grid's seed-0 validation AUCs differ by at most "
        + (f"{max(spreads):.5f} (median {statistics.median(spreads):.5f})" if spreads else "–")
        + ", so which γ is kept is decided by differences of that size on one seed; the Hessian table above gives "
        "the paired validation evidence (every seed) across approximations and strengths.",
        "",
    ]
    return L


def conclusions(report: dict, cfg: dict) -> list[str]:
    """Counted statements only: what the verdicts say, and in which cells beyond noise."""
    verdicts: dict[str, dict[str, list[str]]] = {}
    for name, proto, _, s in cells(report, cfg):
        for m, r in s["rows"].items():
            p = r["vs_ew_dm"] or r["vs_ew_auc"]
            if m != "ew" and p:
                v = verdicts.setdefault(m, {"better": [], "worse": [], "no detectable difference": []})
                v[p["verdict"]].append(f"{name}/{proto} ({fmt_pair(p)})")
    L = ["## What a user should conclude", ""]
    for m, v in verdicts.items():
        n = sum(map(len, v.values()))
        line = f"- `{m}` against `ew` ({n} data-set/protocol cells; Δm% points, 95 % paired intervals over seeds): "
        line += f"better in {len(v['better'])}, worse in {len(v['worse'])}, no detectable difference in "
        line += f"{len(v['no detectable difference'])}."
        for word in ("better", "worse"):
            if v[word]:
                line += f" {word.capitalize()}: " + "; ".join(v[word]) + "."
        L.append(line)
    L += hessian_conclusion(report)
    c = verdicts.get("cograd")
    if c and not c["better"]:
        L.append("- **CoGrad never beat `ew` beyond noise in this study.**")
    elif c:
        L.append(f"- CoGrad beat `ew` beyond noise in {len(c['better'])} cell(s), listed above.")
    L += [
        "- A cell's verdict is per data set and protocol; with several methods and cells compared, an occasional "
        "interval that excludes 0 is expected by chance alone (about 1 in 20 per comparison when nothing differs).",
        "- Whether measuring transference first predicts the gain: see the rank correlations and the figure below.",
        "",
    ]
    return L


def setup_section(cfg: dict, args) -> list[str]:
    s, f, c = cfg["scratch"], cfg["finetune"], cfg["census"]
    L = [
        "## Setup",
        "",
        f"- Seeds {', '.join(map(str, cfg['seeds']))} (`init --seed s` and `train --seed s`); methods "
        + ", ".join(f"`{m}`" for m in cfg["methods"])
        + f" at their defaults; CoGrad with `{' '.join(COGRAD_FIXED)}` and γ chosen per cell from "
        + "{"
        + ", ".join(f"{g:g}" for g in cfg["cograd_grid"])
        + "} by the seed-0 run's mean validation AUC at its last step.",
        f"- Synthetic (`sample-data --tasks a=1:0.3,b=ρ:0.3`), ρ ∈ {{{', '.join(f'{r:g}' for r in cfg['rhos'])}}}: "
        f"{cfg['syn']['rows']} training, {cfg['syn']['valid']} validation, {cfg['syn']['test']} test rows and "
        f"{cfg['syn']['ft_rows']} unseen rows for fine-tuning; the MMoE model ({json.dumps(cfg['syn']['model']) if cfg['syn']['model'] else 'its defaults'}).",
        f"- scratch: Adam, lr {s['lr']:g}, {s['warmup']} warmup steps then cosine decay to 0, {s['epochs']} epochs, batch {s['batch']}.",
        f"- finetune (synthetic): from the seed's scratch `ew` model, constant lr {f['lr']:g}, {f['epochs']} epochs, batch {f['batch']}, on the unseen rows.",
    ]
    if c and args.source:
        L.append(
            f"- Census-Income (KDD), groups {', '.join(c['groups'])}: scratch on the full training split, lr {c['lr']:g}, "
            f"{c['warmup']} warmup steps then cosine, {c['epochs']} epoch(s), batch {c['batch']}; finetune: the training "
            "split cut in two random halves (seed 0), the base (and each single-task model) trained from scratch on the "
            f"first with that schedule, then fine-tuned on the second at a constant lr {c['finetune']['lr']:g}, "
            f"{c['finetune']['epochs']} epoch(s), batch {c['finetune']['batch']}. The fine-tuning of a converged census "
            "base under a decaying lr is [docs/results-census.md](results-census.md)."
        )
    else:
        L.append(
            "- Census-Income: not part of this run (no `--source`, or `--quick`/`--tiny`); see [docs/results-census.md](results-census.md)."
        )
    L += [
        "- Scored: each run's `last.safetensors`, once, on test (`evaluate --json`); validation AUCs are `train`'s at the last step.",
        "- Δm% = mean over tasks of (AUC_t − AUC_single,t) / AUC_single,t × 100 (LibMTL, higher is better); "
        "single-task AUCs are the mean over seeds of the single-task models of the same cell.",
        "- Every difference against `ew` is paired by seed: mean, 95 % Student-t interval; *better*/*worse* only when "
        "the interval excludes 0.",
        "",
    ]
    return L


def load_note(records: list[dict]) -> str:
    loads = [r["load"] for r in records if "load" in r]
    if not loads:
        return ""
    return (
        f" (1-minute load average as the steps ended: median {statistics.median(loads):.1f}, on {os.cpu_count()} cores)"
    )


def write_results(report: dict, cfg: dict, args, path: Path) -> None:
    import torch

    lost = missing(report, cfg)
    records = sorted(report["records"].values(), key=lambda r: r["started"])
    busy = sum(r["seconds"] for r in records)
    span = max((r["started"] + r["seconds"] for r in records), default=0) - min(
        (r["started"] for r in records), default=0
    )
    png = path.with_name(path.stem + "-gain.png")
    drew = figure(report, cfg, png)
    mode = "--tiny" if args.tiny else "--quick" if args.quick else ""
    command = f"python benchmarks/study.py --out {args.out}" + (f" --source {args.source}" if args.source else "")
    command += f" --jobs {args.jobs}" + (f" {mode}" if mode else "")
    L = [
        "# Where the gradient methods matter: the evidence study",
        "",
        "Generated by `benchmarks/study.py` (do not edit by hand): "
        + ("**PARTIAL** — missing cells are listed at the end." if lost else "complete."),
        "",
        f"Command: `{command}`",
        "",
        *conclusions(report, cfg),
        *setup_section(cfg, args),
        "## Machine and time",
        "",
        f"- {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cores; "
        f"{args.jobs} step(s) at a time, one torch thread each.",
        f"- {len(records)} steps; from the first step's start to the last one's end {span / 60:.1f} min wall; the "
        f"steps' summed wall time is {busy / 60:.1f} min, i.e. about {busy / 60 / max(1, args.jobs):.1f} min at "
        f"{args.jobs} at a time. The machine was shared with other agents' jobs while this ran, so both times "
        "are inflated against an idle machine" + load_note(records) + ".",
        "",
    ]
    for name, proto, p, summary in cells(report, cfg):
        L += [f"## {name} — {proto}", "", *results_table(report["datasets"][name]["tasks"], summary, p), ""]
    L += prediction_section(report, cfg, png.name if drew else None)
    L += ["", *hessian_section(report, cfg), *defaults_section(report, cfg)]
    if lost:
        L += ["## Missing (PARTIAL)", "", "Not finished when this file was written: " + "; ".join(lost) + ".", ""]
    L += [
        "## Exact commands",
        "",
        f"Every `cogradctl` call, in the order run, with its wall time; `$OUT` is `{args.out}`.",
        "",
    ]
    L += ["<details><summary>the commands</summary>", "", "```"]
    L += [f"{r['command'].replace(str(args.out), '$OUT')}    # {r['seconds']:.1f}s" for r in records]
    L += ["```", "", "</details>", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(L))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="working directory: data, checkpoints, runs, step records")
    p.add_argument("--source", default=None, help="directory with the raw UCI census-kdd files (no census without it)")
    p.add_argument(
        "--quick", action="store_true", help="a smaller study (≤ 5 min on 2 idle cores): ρ = 0, 3 seeds, 4 methods"
    )
    p.add_argument("--tiny", action="store_true", help="the test's size: 2 seeds, ew and cograd, a few hundred rows")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="steps at a time (default: the core count)")
    p.add_argument("--in-process", action="store_true", help="call the CLI in this interpreter (one step at a time)")
    p.add_argument(
        "--fresh-processes",
        action="store_true",
        help="a new cogradctl process per step (default: --jobs long-lived workers)",
    )
    p.add_argument("--report-only", action="store_true", help="run nothing: write the results from the recorded steps")
    p.add_argument(
        "--results", default=None, help="the markdown file (default docs/results.md; --quick/--tiny: OUT/results.md)"
    )
    args = p.parse_args(argv)
    if args.in_process:
        args.jobs = 1
    cfg = TINY if args.tiny else QUICK if args.quick else FULL
    default = ROOT / "docs" / "results.md"
    path = (
        Path(args.results) if args.results else (Path(args.out) / "results.md" if args.quick or args.tiny else default)
    )
    report = run_study(args, cfg)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1, default=str))
    write_results(report, cfg, args, path)
    print(f"wrote {path} ({report['seconds'] / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()
