"""Data-loader benchmarks (docs/data.md): throughput, the share of a training step spent waiting on
data, and peak RSS on 1 M vs 20 M rows. Generated data lives under --dir (default /tmp), never in
the repository.

    python benchmarks/loader.py [--dir /tmp/cogradctl-loader] [--rows 4000000] [--small 1000000]
                                [--large 20000000] [--steps 200] [--batch-size 1024] [--json OUT]

1. throughput: ParquetStream from Parquet to model-ready tensors (sample schema: 6 dense, 3
   categorical features, 3 binary tasks), one pass, pinned to one core (sched_setaffinity, torch
   and Arrow at one thread), in order and shuffled (64 Ki-row buffer), batch 4096 and 1024.
2. data wait: the built-in mmoe (default config) trained with ``cogradctl.train.train_step``
   (method ew, Adam) on the stream for --steps steps on one core; the time spent in ``next()`` on
   the stream against the whole step.
3. peak RSS: a child process streams one shuffled epoch (64 Ki-row buffer, batch 1024) over the
   data, training the mmoe on the first --steps batches and encoding every later batch; its peak RSS
   is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, read in a fresh intermediate process per
   size so that the two children do not share one maximum.

``--row-groups 1,16,256`` runs only the small-row-group case instead (issue #21, item 11): the
sample data (sample_data/train.parquet, 20 000 rows) rewritten with those row-group sizes, each
timed against the file as shipped over one shuffled epoch (batch 1024, seed 0), interleaved over
--rounds rounds on one core; the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

TASKS = ["click", "like", "share"]
CHUNK = 1_000_000


def one_core() -> str:
    import pyarrow as pa
    import torch

    cpu = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    return f"core {cpu}"


def make(root: Path, rows: int) -> Path:
    """``rows`` sample rows as part-NNNNN.parquet files of up to 1 M rows (reused if already there)."""
    import pyarrow.parquet as pq

    from cogradctl import sample

    done = root / f".complete-{rows}"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("part-*.parquet"):
        old.unlink()
    for k, start in enumerate(range(0, rows, CHUNK)):
        n = min(CHUNK, rows - start)
        pq.write_table(sample.generate(n, seed=1000 + k), root / f"part-{k:05d}.parquet", row_group_size=256 * 1024)
    done.touch()
    return root


def schema_of(root: Path):
    from cogradctl import data

    first = sorted(root.glob("part-*.parquet"))[0]
    return data.infer_schema(str(first), TASKS, {t: "binary" for t in TASKS})[0]


def throughput(root: Path) -> list[dict]:
    from cogradctl.stream import ParquetStream

    schema = schema_of(root)
    out = []
    for batch in (4096, 1024):
        for shuffle in (False, True):
            s = ParquetStream(str(root), schema)
            t = time.perf_counter()
            n = sum(len(y) for _, y in s.batches(batch, shuffle=shuffle, seed=0))
            dt = time.perf_counter() - t
            out.append(
                {
                    "batch_size": batch,
                    "shuffle": shuffle,
                    "rows": n,
                    "seconds": round(dt, 3),
                    "rows_per_s": round(n / dt),
                }
            )
            print(
                f"  batch {batch:5d} {'shuffled' if shuffle else 'in order'}: {n / dt / 1e6:.2f} M rows/s",
                file=sys.stderr,
            )
    return out


SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "train.parquet"


def row_groups(root: Path, sizes: list[int], rounds: int, batch_size: int) -> dict:
    """Median seconds of one shuffled epoch of the sample data as shipped and rewritten with each
    row-group size in ``sizes``, the cases interleaved in every round."""
    import statistics

    import pyarrow.parquet as pq

    from cogradctl import data
    from cogradctl.stream import ParquetStream

    root.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(SAMPLE)
    cases = {"as shipped": SAMPLE}
    for n in sizes:
        path = root / f"train-rg{n}.parquet"
        if not path.exists():
            pq.write_table(table, path, row_group_size=n)
        cases[f"row groups of {n}"] = path
    schema = data.infer_schema(str(SAMPLE), TASKS, {t: "binary" for t in TASKS})[0]
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(rounds):
        for name, path in cases.items():
            t = time.perf_counter()
            s = ParquetStream(str(path), schema)
            rows = sum(len(y) for _, y in s.batches(batch_size, shuffle=True, seed=0))
            times[name].append(time.perf_counter() - t)
            assert rows == table.num_rows, (name, rows)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), file=sys.stderr)
    groups = {k: pq.ParquetFile(p).metadata.num_row_groups for k, p in cases.items()}
    return {
        "rows": table.num_rows,
        "batch_size": batch_size,
        "rounds": rounds,
        "cases": {
            k: {"row_groups": groups[k], "median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3)}
            for k, v in times.items()
        },
    }


def trainer(schema):
    import torch

    from cogradctl import models
    from cogradctl.methods import get_method
    from cogradctl.taskgrad import TaskGradients
    from cogradctl.train import train_step

    net, config = models.build("mmoe", schema, {})
    split = models.split_parameters(net, schema.task_names, "mmoe")
    grads = TaskGradients(net, split, schema, "cpu")
    method = get_method("ew")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    return (lambda inputs, labels: train_step(grads, method, optimizer, inputs, labels)), config


def data_wait(root: Path, steps: int, batch_size: int) -> dict:
    from cogradctl.stream import ParquetStream

    schema = schema_of(root)
    step, config = trainer(schema)
    it = ParquetStream(str(root), schema).batches(batch_size, shuffle=True, seed=0)
    waited = computed = 0.0
    for k in range(steps + 5):
        t0 = time.perf_counter()
        inputs, labels = next(it)
        t1 = time.perf_counter()
        step(inputs, labels)
        t2 = time.perf_counter()
        if k >= 5:  # warm-up steps are not counted
            waited += t1 - t0
            computed += t2 - t1
    return {
        "steps": steps,
        "batch_size": batch_size,
        "model": "mmoe",
        "model_config": config,
        "method": "ew",
        "data_ms_per_step": round(1000 * waited / steps, 3),
        "step_ms": round(1000 * (waited + computed) / steps, 3),
        "data_fraction": round(waited / (waited + computed), 4),
    }


def rss_child(root: Path, steps: int, batch_size: int) -> None:
    from cogradctl.stream import ParquetStream

    one_core()
    schema = schema_of(root)
    step, _ = trainer(schema)
    rows = 0
    for k, (inputs, labels) in enumerate(ParquetStream(str(root), schema).batches(batch_size, shuffle=True, seed=0)):
        if k < steps:
            step(inputs, labels)
        rows += len(labels)
    print(json.dumps({"rows": rows}))


def rss_measure(root: Path, steps: int, batch_size: int) -> None:
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "_rss-child", str(root), str(steps), str(batch_size)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    print(
        json.dumps(
            {**json.loads(out), "peak_rss_mb": round(peak_kb / 1024, 1), "seconds": round(time.perf_counter() - t, 1)}
        )
    )


def peak_rss(root: Path, steps: int, batch_size: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "_rss-measure", str(root), str(steps), str(batch_size)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_rss-child", "_rss-measure"):
        fn = rss_child if sys.argv[1] == "_rss-child" else rss_measure
        fn(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/cogradctl-loader"))
    p.add_argument("--rows", type=int, default=4_000_000, help="rows for the throughput run")
    p.add_argument("--small", type=int, default=1_000_000)
    p.add_argument("--large", type=int, default=20_000_000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--row-groups", help="only the small-row-group case: comma-separated row-group sizes")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the --row-groups case")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    import pyarrow
    import torch

    core = one_core()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs visible, pinned to {core}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, pyarrow {pyarrow.__version__}"
    }
    if args.row_groups:
        sizes = [int(x) for x in args.row_groups.split(",")]
        result["row_groups"] = row_groups(args.dir / "row-groups", sizes, args.rounds, args.batch_size)
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
        return
    print("generating data …", file=sys.stderr)
    main_dir = make(args.dir / f"rows-{args.rows}", args.rows)
    print("throughput", file=sys.stderr)
    result["throughput"] = throughput(main_dir)
    print("data wait", file=sys.stderr)
    result["data_wait"] = data_wait(main_dir, args.steps, args.batch_size)
    print(f"  {result['data_wait']}", file=sys.stderr)
    if not args.skip_rss:
        result["peak_rss"] = {}
        for n in (args.small, args.large):
            root = make(args.dir / f"rows-{n}", n)
            result["peak_rss"][str(n)] = peak_rss(root, args.steps, args.batch_size)
            print(f"  {n} rows: {result['peak_rss'][str(n)]}", file=sys.stderr)
        small, large = (result["peak_rss"][str(n)]["peak_rss_mb"] for n in (args.small, args.large))
        result["rss_ratio"] = round(large / small, 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
