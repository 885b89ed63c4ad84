"""measure-transference speed against its floor, for K = 2, 4, 8 tasks on the built-in MMoE.

Floor per measured batch (docs/methods.md §1): one forward, K backward passes onto the shared
parameters, K lookahead forwards — timed here as the bare PyTorch calls (``model(x)``,
``torch.autograd.grad`` onto the shared parameters, ``model(x)`` under no_grad) on the same
batches. Measured: ``cogradctl.transference.measure_per_batch`` (batch slicing, the lookahead via
``functional_call``, all matrices). The two alternate in each repetition so a noisy, shared
machine slows both alike; the table reports the best (minimum) time of each over the repetitions —
the least disturbed run — and the ratio of the two minima (the median ratio of the paired runs is
shown too, as a check on noise).

    python benchmarks/bench_transference.py [--batches 4] [--batch-size 1024] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from cogradctl import data as data_io
from cogradctl import models, sample
from cogradctl import transference as tr
from cogradctl.bench import cpu_model
from cogradctl.taskgrad import task_losses


def setup(k: int, rows: int, tmp: str):
    rhos = np.linspace(1.0, -0.6, k)
    spec = {f"t{i}": (float(r), 0.3) for i, r in enumerate(rhos)}
    path = os.path.join(tmp, f"k{k}.parquet")
    sample.write(sample.generate(rows, spec, seed=0), path)
    names = list(spec)
    schema, _ = data_io.infer_schema(path, names, {t: "binary" for t in names})
    torch.manual_seed(0)
    model, _ = models.build("mmoe", schema, {})
    model.eval()
    split = models.split_parameters(model, names, "mmoe")
    return model, split, schema, data_io.load(path, schema)


def floor(model, split, schema, data, ranges) -> None:
    k = len(schema.tasks)
    for start, stop in ranges:
        inputs, labels = data.batch(slice(start, stop))
        losses = task_losses(model(inputs), labels, schema)
        for i in range(k):
            torch.autograd.grad(losses[i], split.shared, retain_graph=i < k - 1, allow_unused=True)
        with torch.no_grad():
            for _ in range(k):
                task_losses(model(inputs), labels, schema)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: least sensitive to other load; 0: torch default)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    print(
        f"machine: {cpu_model()}; {os.cpu_count()} logical cores, torch {torch.__version__} using {torch.get_num_threads()} threads; "
        f"Python {platform.python_version()}"
    )
    print(
        f"model: mmoe (defaults: 8 experts [64], towers [32]); {args.batches} batches × {args.batch_size} rows; best of {args.repeats} repeats\n"
    )
    print(f"{'K':>3} {'floor ms/batch':>15} {'measured ms/batch':>18} {'ratio':>7} {'median paired ratio':>20}")
    with tempfile.TemporaryDirectory() as tmp:
        for k in (2, 4, 8):
            model, split, schema, data = setup(k, args.batches * args.batch_size, tmp)
            ranges = tr.pick_batches(len(data), args.batches, args.batch_size, 0)
            floor(model, split, schema, data, ranges[:1])  # warm-up
            tr.measure_per_batch(model, split, schema, data, 1, args.batch_size)
            t_floor, t_meas, ratios = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                floor(model, split, schema, data, ranges)
                t1 = time.perf_counter()
                tr.measure_per_batch(model, split, schema, data, args.batches, args.batch_size)
                t2 = time.perf_counter()
                t_floor.append(t1 - t0)
                t_meas.append(t2 - t1)
                ratios.append((t2 - t1) / (t1 - t0))
            n = len(ranges)
            best_f, best_m = min(t_floor), min(t_meas)
            print(
                f"{k:>3} {1e3 * best_f / n:>15.1f} {1e3 * best_m / n:>18.1f} {best_m / best_f:>7.3f} {statistics.median(ratios):>20.3f}"
            )


if __name__ == "__main__":
    main()
