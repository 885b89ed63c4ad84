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
    from cogradctl.distributed import StepReducer, process_group
    from cogradctl.methods import get_method
    from cogradctl.models import build, split_parameters
    from cogradctl.stream import ParquetStream
    from cogradctl.taskgrad import TaskGradients
    from cogradctl.train import TrainConfig, make_optimizer, train_step, trainable

    torch.set_num_threads(args.threads)
    comm = [0.0]
    real = tdist.all_reduce

    def timed(tensor, *a, **kw):
        start = time.perf_counter()
        out = real(tensor, *a, **kw)
        if tensor.is_cuda:
            torch.cuda.synchronize()
        comm[0] += time.perf_counter() - start
        return out

    tdist.all_reduce = timed
    with process_group(args.device) as (dist, device_name):
        device = torch.device(device_name)
        source = ckpt_io.load(args.checkpoint)
        model, _ = build(source.model, source.schema, source.model_config)
        ckpt_io.load_into(model, source.state, args.checkpoint)
        model.to(device).train()
        split = split_parameters(model, source.schema.task_names, source.model)
        method = get_method(args.method).to(device)
        method.setup(len(source.schema.task_names))
        method.segments = [p.numel() for p in split.shared]
        cfg = TrainConfig(
            checkpoint=args.checkpoint, data=args.data, out="-", batch_size=args.global_batch // dist.world
        )
        optimizer = make_optimizer(cfg, trainable(model, split, method)[0])  # as train's
        grads = TaskGradients(model, split, source.schema, device)
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
        step_times, comm_times = [], []
        for i in range(args.warmup + args.steps):
            inputs, labels = next(batches)
            comm[0] = 0.0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(grads, method, optimizer, inputs, labels, reduce=reduce)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                step_times.append(time.perf_counter() - start)
                comm_times.append(comm[0])
        if dist.main:
            print(
                json.dumps(
                    {
                        "world": dist.world,
                        "step_ms": 1e3 * statistics.median(step_times),
                        "comm_ms": 1e3 * statistics.median(comm_times),
                        "shared": split.num_shared,
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
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        sys.stdout.flush()
        os._exit(0)  # as cogradctl does under torchrun: no interpreter finalisation with gloo threads alive

    from cogradctl import sample
    from cogradctl.bench import cpu_model

    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.parquet"
        sample.write(sample.generate(args.global_batch * (args.steps + args.warmup + 2), seed=0), data)
        for model_name, options in MODELS.items():
            ckpt = Path(tmp) / f"{len(rows)}.safetensors"
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
                    results["1p·all"].append(
                        run([sys.executable, *common, "--threads", str(min(args.nproc, cores))], env)
                    )
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
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
