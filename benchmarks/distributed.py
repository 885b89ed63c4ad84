"""Data-parallel scaling on this machine (issue #6): 1 process against 2 under torchrun (gloo, CPU).

    python benchmarks/distributed.py [--steps 60] [--out docs/benchmarks-distributed.md]

For each method and model size, the same global batch is trained three ways on the same cores:
one process with 2 threads, one process with 1 thread, and 2 processes × 1 thread (torchrun,
each on half of the batch, its own data shard). Each run is the real training step
(``cogradctl.train.train_step`` with the ``StepReducer`` of ``cogradctl train``) reading the real
Parquet stream; ``torch.distributed.all_reduce`` is wrapped to time the communication (gloo on CPU
is synchronous, so the wall time inside the call is the communication cost, including waiting for
the slower process). Reported: median ms per step, global rows per second, the communication
share of step time, and the speed-up over one process with the same cores.

A second table (section ``tables``): the bytes each process hands to the collectives per step
for an mmoe whose one embedding table has 2^20 + 256 rows × 16 (a ``hash:2^20`` id feature of
uniformly drawn ids, so the global batch touches about as many rows as it has; the sample's own
features' 256 rows), ``ew`` on 2 processes, with ``--embeddings dense`` (the tables' K × rows × dim
columns all-reduced) against ``coordinate`` and ``sum`` (touched rows exchanged:
``StepReducer.rows``). Counted from the tensors actually passed to ``all_reduce``/``all_gather``
(for ``all_gather``, the tensor this process sends), not from a formula.

    python benchmarks/distributed.py --sections tables     # this table alone, printed

The same command on a GPU machine (``--device cuda``) gives single-GPU throughput; with several
GPUs use ``--nproc`` (NCCL).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # name → init options (the sample data's 9 features, 3 tasks)
    "mmoe (default, 8 experts [64])": [],
    "mmoe wide (8 experts [512, 256])": ["--config", "expert=[512, 256]"],
}


def worker(args) -> None:
    """One process of a run: time ``args.steps`` training steps after a warm-up."""
    import torch.distributed as tdist

    from cogradctl import checkpoint as ckpt_io
    from cogradctl import tables
    from cogradctl.distributed import StepReducer, process_group
    from cogradctl.methods import get_method
    from cogradctl.models import build, split_parameters
    from cogradctl.stream import ParquetStream
    from cogradctl.taskgrad import TaskGradients
    from cogradctl.train import TrainConfig, make_optimizer, train_step, trainable

    torch.set_num_threads(args.threads)
    comm, sent = [0.0], [0]

    def timed(real, tensor_at):
        def call(*a, **kw):
            tensor = a[tensor_at]
            start = time.perf_counter()
            out = real(*a, **kw)
            if tensor.is_cuda:
                torch.cuda.synchronize()
            comm[0] += time.perf_counter() - start
            sent[0] += tensor.numel() * tensor.element_size()
            return out

        return call

    tdist.all_reduce = timed(tdist.all_reduce, 0)
    tdist.all_gather = timed(tdist.all_gather, 1)  # (outputs, this process's tensor)
    with process_group(args.device) as (dist, device_name):
        device = torch.device(device_name)
        source = ckpt_io.load(args.checkpoint)
        model, _ = build(source.model, source.schema, source.model_config)
        ckpt_io.load_into(model, source.state, args.checkpoint)
        model.to(device).train()
        split = split_parameters(model, source.schema.task_names, source.model)
        method = get_method(args.method).to(device)
        method.setup(len(source.schema.task_names))
        tables.separate(model, split, args.embeddings)
        method.segments = [p.numel() for p in split.shared]
        cfg = TrainConfig(
            checkpoint=args.checkpoint, data=args.data, out="-", batch_size=args.global_batch // dist.world
        )
        optimizer = make_optimizer(cfg, trainable(model, split, method)[0], tables=len(split.tables))  # as train's
        grads = TaskGradients(model, split, source.schema, device, sum_tables=args.embeddings == "sum")
        reduce = StepReducer(dist) if dist.world > 1 else None
        stream = ParquetStream(args.data, source.schema)
        batches = stream.batches(
            args.global_batch // dist.world,
            shuffle=True,
            seed=0,
            epoch=1,
            device=device,
            shards=dist.world,
            take=dist.shards(dist.world),
        )
        step_times, comm_times, sent_bytes, row_bytes = [], [], [], []
        for i in range(args.warmup + args.steps):
            inputs, labels = next(batches)
            comm[0], sent[0] = 0.0, 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(grads, method, optimizer, inputs, labels, reduce=reduce)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                step_times.append(time.perf_counter() - start)
                comm_times.append(comm[0])
                sent_bytes.append(sent[0])
                row_bytes.append(reduce.row_bytes if reduce is not None and split.tables else 0)
        if dist.main:
            print(
                json.dumps(
                    {
                        "world": dist.world,
                        "step_ms": 1e3 * statistics.median(step_times),
                        "comm_ms": 1e3 * statistics.median(comm_times),
                        "shared": split.num_shared,
                        "sent_bytes": statistics.median(sent_bytes),
                        "row_bytes": statistics.median(row_bytes),  # StepReducer.rows: sizes, indices, rows
                        "table_rows": sum(m.num_embeddings for _, m in tables.embedding_tables(model, split)),
                        "K": len(source.schema.task_names),
                    }
                )
            )


def run(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--methods", default="ew,cograd,pcgrad")
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed run")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--sections", default="scaling,tables", help="scaling, tables (bytes per step of a 2^20-row table)")
    p.add_argument("--table-steps", type=int, default=5, help="steps of the tables section")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--embeddings", default="dense", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        sys.stdout.flush()
        os._exit(0)  # as cogradctl does under torchrun: no interpreter finalisation with gloo threads alive

    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        lines = scaling(args, Path(tmp)) if "scaling" in sections else []
        if "tables" in sections:
            lines += table_bytes(args, Path(tmp))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def scaling(args, tmp: Path) -> list[str]:
    """The scaling table: each model and method, 1 process (all threads, 1 thread) against --nproc."""
    from cogradctl import sample
    from cogradctl.bench import cpu_model

    cores = os.cpu_count() or 1
    rows = []
    data = tmp / "train.parquet"
    sample.write(sample.generate(args.global_batch * (args.steps + args.warmup + 2), seed=0), data)
    for model_name, options in MODELS.items():
        ckpt = tmp / f"{len(rows)}.safetensors"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cogradctl",
                "init",
                "--model",
                "mmoe",
                *options,
                "--data",
                str(data),
                "--tasks",
                "click,like,share",
                "--out",
                str(ckpt),
                "--quiet",
            ],
            check=True,
            cwd=ROOT,
        )
        for method in args.methods.split(","):
            common = [
                __file__,
                "--worker",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(data),
                "--method",
                method,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--global-batch",
                str(args.global_batch),
                "--device",
                args.device,
            ]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            # Interleaved, twice, so that a drift of the shared machine hits all three alike.
            results: dict[str, list[dict]] = {"1p·all": [], "1p·1": [], "np·1": []}
            for _ in range(2):
                results["1p·all"].append(run([sys.executable, *common, "--threads", str(min(args.nproc, cores))], env))
                results["1p·1"].append(run([sys.executable, *common, "--threads", "1"], env))
                results["np·1"].append(
                    run(
                        [
                            sys.executable,
                            "-m",
                            "torch.distributed.run",
                            "--standalone",
                            "--nproc-per-node",
                            str(args.nproc),
                            *common,
                            "--threads",
                            "1",
                        ],
                        env,
                    )
                )
            best = {k: min(v, key=lambda r: r["step_ms"]) for k, v in results.items()}
            rows.append((model_name, method, best))
            print(
                f"{model_name} {method}: " + ", ".join(f"{k} {v['step_ms']:.2f} ms" for k, v in best.items()),
                file=sys.stderr,
            )
    n = args.nproc
    lines = [
        "# Data-parallel scaling",
        "",
        "Written by `python benchmarks/distributed.py"
        + (f" --steps {args.steps}" if args.steps != 60 else "")
        + "`; do not edit by hand.",
        "",
        f"Machine: {cpu_model()}, {cores} cores, torch {torch.__version__}, Python {platform.python_version()}, device {args.device}. "
        f"Global batch {args.global_batch} rows of the sample data (K = 3 tasks), median of {args.steps} steps after {args.warmup} "
        "of warm-up, best of two interleaved repetitions.",
        "",
        f"| model (shared parameters) | method | 1 process × {min(n, cores)} threads, ms | 1 process × 1 thread, ms | {n} processes × 1 thread, ms "
        f"| of which all-reduce, ms (share) | all-reduced floats per step | rows/s, {n} processes | speed-up vs 1 × {min(n, cores)} threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model_name, method, best in rows:
        a, b, c = best["1p·all"], best["1p·1"], best["np·1"]
        k, shared = c["K"], c["shared"]
        lines.append(
            f"| {model_name} ({shared:,}) | {method} | {a['step_ms']:.2f} | {b['step_ms']:.2f} | {c['step_ms']:.2f} "
            f"| {c['comm_ms']:.2f} ({c['comm_ms'] / c['step_ms']:.0%}) | ≈ {k} × {shared:,} + task-specific + {k + 2} "
            f"| {args.global_batch / c['step_ms'] * 1e3:,.0f} | {a['step_ms'] / c['step_ms']:.2f}× |"
        )
    return lines


def table_bytes(args, tmp: Path) -> list[str]:
    """Bytes handed to the collectives per step with a 2^20-row table: dense against touched rows."""
    import numpy as np
    import pyarrow as pa

    from cogradctl import sample

    data, ckpt = tmp / "ids.parquet", tmp / "ids.safetensors"
    table = sample.generate(args.global_batch * (args.table_steps + 2), seed=1)
    ids = np.random.default_rng(0).integers(0, 1 << 40, size=len(table))
    sample.write(table.append_column("user_id", pa.array(ids, pa.int64())), data)
    init = [sys.executable, "-m", "cogradctl", "init", "--model", "mmoe", "--data", str(data), "--out", str(ckpt)]
    init += ["--tasks", "click,like,share", "--config", "embedding_dim=16", "--encoding", "user_id=hash:1048576"]
    subprocess.run([*init, "--quiet"], check=True, cwd=ROOT)
    common = [__file__, "--worker", "--checkpoint", str(ckpt), "--data", str(data), "--method", "ew"]
    common += ["--steps", str(args.table_steps), "--warmup", "1", "--global-batch", str(args.global_batch)]
    common += ["--device", args.device, "--threads", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    found = {mode: run([*torchrun, *common, "--embeddings", mode], env) for mode in ("dense", "coordinate", "sum")}
    dense = found["dense"]["sent_bytes"]
    lines = [
        "",
        f"## Embedding tables: bytes per step, dense all-reduce against touched rows ({args.nproc} processes)",
        "",
        f"mmoe with one embedding table of {found['dense']['table_rows']:,} rows × 16 (a `hash:1048576` id "
        f"feature of uniformly drawn ids), `ew`, global batch {args.global_batch}, K = {found['dense']['K']}; "
        "the bytes one process handed to `all_reduce`/`all_gather` in a step (median of "
        f"{args.table_steps} steps), counted from the tensors passed; step time on this machine, as loaded.",
        "",
        "| --embeddings | bytes per step per process | of dense | of which touched rows (sizes, indices, values) "
        "| step, ms | of which communication, ms |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in found.items():
        lines.append(
            f"| {mode} | {r['sent_bytes']:,.0f} | {r['sent_bytes'] / dense:.2%} | {r['row_bytes']:,.0f} "
            f"| {r['step_ms']:.1f} | {r['comm_ms']:.1f} |"
        )
    return lines


if __name__ == "__main__":
    main()
