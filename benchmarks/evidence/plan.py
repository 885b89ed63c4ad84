"""The study's steps: data sets, both protocols, every method, the single-task models, the Hessian study."""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from .config import COGRAD_FIXED, SMALL_MMOE
from .runner import Pool, Runner


class Study:
    def __init__(self, args, cfg: dict) -> None:
        self.cfg, self.out = cfg, Path(args.out)
        workers = 0 if args.fresh_processes else max(1, args.jobs)
        self.run = Runner(self.out, args.in_process, args.report_only, workers)
        self.pool = Pool(1 if args.in_process else max(1, args.jobs))
        self.source = args.source

    def model_options(self, model: dict) -> list:
        return [x for k, v in model.items() for x in ("--config", f"{k}={json.dumps(v, separators=(',', ':'))}")]

    def init(self, key: str, data: Path, tasks: list[str], seed: int, model: dict, exclude=()) -> Path | None:
        """A model of ``tasks``; ``exclude``: columns that must not be features (a single-task model's
        other tasks: their labels would leak; a weight column)."""
        path = self.out / "ckpt" / f"{key}.safetensors"
        args = ["init", "--model", "mmoe", "--data", data, "--tasks", ",".join(tasks), *self.model_options(model)]
        args += ["--exclude-features", ",".join(exclude)] if exclude else []
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
        weight = ["--weight-column", data["weight"]] if data.get("weight") else []
        result = self.run(key, [*args, *weight, "--seed", seed, "--overwrite", "--json", "-q"])
        if result is None:
            return None
        test = self.run(
            f"{key}-test",
            ["evaluate", "--checkpoint", out / "last.safetensors", "--data", data["test"], *weight, "--json", "-q"],
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

    def ctr_cvr(self, priority: int) -> dict:
        """``sample-data --kind ctr-cvr``: click, and purchase observed only where click = 1 (a partial
        label, masked), a sequence feature and a row weight; split as the synthetic data sets."""
        name, c = "ctr-cvr", self.cfg["syn"]
        d = self.out / "data" / name
        common = ["sample-data", "--kind", "ctr-cvr", "--json"]
        self.step(
            priority, f"{name}-data", [*common, "--out", d / "base", "--rows", c["rows"], "--valid-rows", c["valid"]]
        )
        args = [*common, "--out", d / "new", "--rows", c["ft_rows"], "--valid-rows", c["test"], "--seed", 1]
        self.step(priority, f"{name}-data2", args)
        data = {"train": d / "base/train.parquet", "valid": d / "base/valid.parquet", "test": d / "new/valid.parquet"}
        data.update(ft=d / "new/train.parquet", weight="weight")
        return {"name": name, "kind": "ctr-cvr", "tasks": ["click", "purchase"], "data": data, "model": c["model"]}

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
        sched = cfg["census"] if ds["kind"] == "census" else cfg["scratch"]
        sub = lambda fn, *a: self.pool.submit(priority, fn, *a)  # noqa: E731
        weight = [data["weight"]] if data.get("weight") else []
        inits = {
            s: sub(self.init, f"{name}-init-s{s}", data["train"], ds["tasks"], s, ds["model"], weight) for s in seeds
        }
        singles = {
            (t, s): sub(
                self.init, f"{name}-init-{t}-s{s}", data["train"], [t], s, ds["model"], _others(ds["tasks"], t) + weight
            )
            for t in ds["tasks"]
            for s in seeds
        }
        protocols = {"scratch": {"sched": sched, "train": data["train"], "start": inits, "single_start": singles}}
        report = {**{k: v for k, v in ds.items() if k != "data"}, "protocols": {}}
        report["protocols"]["scratch"] = self.protocol(ds, "scratch", protocols["scratch"], sub)
        if ds["kind"] != "census":
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
            args += ["--weight-column", data["weight"]] if data.get("weight") else []
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


def _others(tasks: list[str], task: str) -> list[str]:
    return [t for t in tasks if t != task]


def _result(future):
    return future.result() if isinstance(future, Future) else future


def _path(run: dict | None):
    return Path(run["dir"]) / "last.safetensors" if run else None


def run_study(args, cfg: dict) -> dict:
    """Every data set in its own orchestrating thread; the report is filled as they finish."""
    study = Study(args, cfg)
    started = time.time()
    # The order is the priority: the CTR/CVR case (the newest), ρ = 0 and the Hessian study first, census last.
    jobs = [("synthetic", rho) for rho in cfg["rhos"]]
    if cfg["hessian"]:
        jobs.insert(1, ("hessian", None))
    jobs[:0] = [("ctr-cvr", None)] if cfg["ctr"] else []
    if cfg["census"] and args.source:
        jobs += [("census", g) for g in cfg["census"]["groups"]]
    report = {"datasets": {}, "hessian": None, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    errors: list[BaseException] = []

    def one(i: int, kind: str, arg) -> None:
        try:
            if kind == "hessian":
                report["hessian"] = study.hessian(i)
                return
            if kind == "ctr-cvr":
                ds = study.ctr_cvr(i)
            else:
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
    report["order"] = (
        [f"syn{r:+g}" for r in cfg["rhos"]]
        + ["ctr-cvr"] * bool(cfg["ctr"])
        + [f"census-{'g' + g if g != 'all' else 'all'}" for g in (cfg["census"] or {}).get("groups", []) if args.source]
    )
    report["seconds"] = time.time() - started
    report["records"] = study.run.records
    return report
