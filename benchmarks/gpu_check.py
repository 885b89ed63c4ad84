"""Every CUDA path of cogradctl, proven in one prepared run (issue #27).

    python benchmarks/gpu_check.py                       # on a machine with a GPU (≤ 6 minutes on one H100/H200)
    python benchmarks/gpu_check.py --device cpu          # the same checks, smaller (what the test suite runs)
    python benchmarks/gpu_check.py --only bench,torchjd  # rerun some areas
    python benchmarks/gpu_check.py --md gpu_check.md     # also write the table as Markdown

It runs the real commands (``python -m cogradctl …``) and prints one table, a row per check:

- ``train``: ``init`` → ``train`` with ew, cograd, gdod and pcgrad at fp32, bf16 and fp16: exit 0,
  finite weights, the loss falls (with ``--device cpu``: each method once, cograd at bf16, the others at
  fp32; fp16 is CUDA-only, so there the check is that it is refused with exit 2).
- ``resume``: SIGKILL mid-run, rerun the same command; the weights must equal an uninterrupted run's bit
  for bit. Both run with ``torch.use_deterministic_algorithms(True)`` and ``CUBLAS_WORKSPACE_CONFIG``
  (cuBLAS may otherwise pick reduction orders that differ between calls), on a model with dropout so
  that the restored CUDA generator state is exercised.
- ``measure``: ``measure-transference`` of one checkpoint on the same batches on CUDA and on the CPU
  (with ``--device cpu``: with 1 and 2 threads, whose reduction orders differ; the optimizer lookahead
  only). Every matrix must agree within ``MEASURE_ATOL``: in float32 the losses and gradients carry
  relative errors of order 1e-6 that depend on the summation order, and the matrices are differences
  of losses of order 0.1–1, so the entries may differ by a few 1e-6; 1e-4 is that with a margin, and
  at or below the smallest standard errors the tool reports (1.1e-4 on the H200 run; most are 1e-3).
- ``torchrun``: ``torchrun --nproc-per-node N`` for every GPU present (NCCL; with ``--device cpu`` two
  gloo processes) against one process with the same global batch and data shards: weights within
  ``DIST_ATOL`` (the all-reduce sums n_r × each gradient and divides by N, which is not exact in float32).
- ``oom``: a model config too large to train fails with exit 2 and one ``error:`` line that says "out of
  GPU memory" (on the CPU: "too large for this machine"), no traceback.
- ``bench``: ``cogradctl bench`` on the default mmoe and a wide one (≥ 1 M shared parameters, batch
  8192 on CUDA; with ``--device cpu`` a small "wide" one alone, K = 2 only), K = 2 and 4: each
  method's step ÷ floor with its 95% interval and peak GPU memory;
  on CUDA the issue's targets are checked: cograd and gdod ≤ 1.10 on the wide model, the others ≤ 1.25.
- ``torchjd``: a CoGrad step against torchjd's ``mtl_backward`` + ``jac_to_grad(UPGrad)`` step on the
  wide model (target on CUDA: CoGrad faster).

On a GPU the areas run one at a time (the out-of-memory check and the timings need the GPU to
themselves); on the CPU independent areas share the cores. Target rows come last, as a summary.
A target row reads MET when the whole 95% interval is within it, MISSED when the whole interval is
outside, UNCLEAR otherwise. Exit status: 1 if any check FAILED, else 3 if a target was MISSED, else 0.
Needs torchjd for the last area (``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cogradctl import checkpoint as ckpt_io  # noqa: E402
from cogradctl.bench import describe_device, ratio_interval  # noqa: E402

AREAS = ["train", "resume", "measure", "torchrun", "oom", "bench", "torchjd"]
CHAINS = [
    ["train", "measure"],
    ["resume"],
    ["torchrun"],
    ["oom"],
    ["bench", "torchjd"],
]  # measure reads a trained model
ROW_ORDER = ["setup", "train", "measure", "resume", "torchrun", "oom", "bench", "torchjd", "target"]
METHODS = ["ew", "cograd", "gdod", "pcgrad"]
PRECISIONS = ["fp32", "bf16", "fp16"]
BENCH_METHODS = "ew,cograd,gdod,pcgrad,mgda,cagrad,imtl-g,aligned-mtl,gradvac,nash-mtl"
TASKS = "click,like,share"  # sample-data's default tasks
MEASURE_ATOL = 1e-4
DIST_ATOL = 1e-5
TARGETS = {"cograd": 1.10, "gdod": 1.10}  # the wide model's step ÷ floor on CUDA; other methods: OTHER_TARGET
OTHER_TARGET = 1.25
# Runs the CLI with deterministic algorithms (raises on an operation that has none).
DETERMINISTIC = (
    "import sys, torch; torch.use_deterministic_algorithms(True); "
    "from cogradctl.cli import main; sys.argv[0] = 'cogradctl'; main()"
)


@dataclass(frozen=True)
class Size:
    """How much each area runs: the CUDA profile fits a 6-minute call, the CPU one a test."""

    rows: int
    train_steps: int
    batch: int
    resume_steps: int
    kill_after: int
    measure_batches: int
    bench_steps: int
    bench_warmup: int
    bench_batches: tuple[int, int]  # default mmoe, wide mmoe
    tasks: tuple[int, ...]
    wide: list[int]  # the wide mmoe's expert layers
    jd_rounds: int
    parallel: int


SIZES = {
    # wide on CUDA: 8 experts [512, 256] on the sample data's 9 features, 1.2 M shared parameters
    "cuda": Size(20000, 60, 256, 400, 100, 8, 50, 3, (2048, 8192), (2, 4), [512, 256], 30, 4),
    "cpu": Size(4000, 16, 128, 60, 12, 3, 2, 1, (256, 256), (2,), [32], 3, 2),
}


@dataclass
class Row:
    area: str
    check: str
    status: str  # PASS, FAIL, SKIP, MET, MISSED, UNCLEAR, INFO
    detail: str


class Check:
    """The run's state: where its files go, which device, and the rows found so far."""

    def __init__(self, device: str, work: Path, size: Size):
        self.device, self.work, self.size = device, work, size
        self.rows: list[Row] = []

    def add(self, area: str, check: str, status: str, detail: str) -> None:
        self.rows.append(Row(area, check, status, detail))
        print(f"[{area}] {check}: {status} {detail}", file=sys.stderr, flush=True)

    def verdict(self, area: str, check: str, ok: bool, detail: str) -> bool:
        self.add(area, check, "PASS" if ok else "FAIL", detail)
        return ok


# --- running the CLI ------------------------------------------------------------------------------


def command(args, deterministic: bool = False, env: dict | None = None, launcher: list[str] = ()):
    """The argv and environment of ``cogradctl ARGS``: through DETERMINISTIC (with cuBLAS's fixed
    workspace), or ``python [LAUNCHER] -m cogradctl`` (``launcher``: e.g. torch.distributed.run's)."""
    head = [sys.executable, "-c", DETERMINISTIC] if deterministic else [sys.executable, *launcher, "-m", "cogradctl"]
    full_env = {**os.environ, "COGRADCTL_DEBUG": "", "PYTHONUNBUFFERED": "1", **(env or {})}
    if deterministic:
        full_env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    return [*head, *map(str, args)], full_env


def cli(*args, deterministic: bool = False, env: dict | None = None, timeout: float = 300):
    """``cogradctl ARGS`` in a subprocess → CompletedProcess (text)."""
    argv, full_env = command(args, deterministic, env)
    return subprocess.run(argv, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def tail(proc, lines: int = 2) -> str:
    text = (proc.stderr or "").strip().splitlines()
    return " | ".join(text[-lines:])[:300]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load(out / "last.safetensors").state


def saved_step(out: Path) -> int:
    try:
        return int(ckpt_io.load(out / "last.safetensors").training_state["step"])
    except Exception:  # not written yet
        return -1


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def setup(c: Check) -> tuple[Path, Path, Path]:
    """Sample data and two fresh mmoe checkpoints (one with dropout for the resume check)."""
    data = c.work / "data"
    proc = cli("sample-data", "--out", data, "--rows", c.size.rows, "--valid-rows", 2048, "--json")
    if proc.returncode:
        raise RuntimeError(f"sample-data failed: {tail(proc)}")
    ckpts = []
    for name, config in (("init", []), ("dropout", ["--config", "dropout=0.1"])):
        path = c.work / f"{name}.safetensors"
        proc = cli(
            "init", "--model", "mmoe", "--data", data / "train.parquet", "--tasks", TASKS, "--out", path, *config
        )
        if proc.returncode:
            raise RuntimeError(f"init failed: {tail(proc)}")
        ckpts.append(path)
    return data, ckpts[0], ckpts[1]


# --- train -----------------------------------------------------------------------------------------


def train_args(c: Check, ckpt: Path, data: Path, out: Path, *extra) -> list:
    return [
        "train",
        "--checkpoint",
        ckpt,
        "--data",
        data / "train.parquet",
        "--out",
        out,
        "--device",
        c.device,
        "--seed",
        0,
        "--quiet",
        *extra,
    ]


def losses(out: Path) -> list[float]:
    """The summed task loss of every step record in metrics.jsonl, in order."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [sum(r["loss"].values()) for r in recs if isinstance(r.get("loss"), dict)]


def one_training(c: Check, ckpt: Path, data: Path, method: str, precision: str) -> None:
    name = f"{method} {precision}"
    out = c.work / f"train-{method}-{precision}"
    extra = ["--method", method, "--precision", precision, "--max-steps", c.size.train_steps]
    extra += ["--batch-size", c.size.batch, "--lr", "0.005", "--log-every", 1]
    start = time.perf_counter()
    proc = cli(*train_args(c, ckpt, data, out, *extra))
    seconds = time.perf_counter() - start
    if precision == "fp16" and c.device == "cpu":  # fp16 needs CUDA: it must be refused, not run
        c.verdict("train", name, proc.returncode == 2 and "fp16" in proc.stderr, f"refused on CPU: {tail(proc, 1)}")
        return
    if proc.returncode != 0:
        c.verdict("train", name, False, f"exit {proc.returncode}: {tail(proc)}")
        return
    finite = all(bool(torch.isfinite(t).all()) for t in weights(out).values())
    seq = losses(out)
    n = max(1, len(seq) // 5)
    first, last = sum(seq[:n]) / n, sum(seq[-n:]) / n
    ok = finite and len(seq) == c.size.train_steps and last < first
    detail = f"{len(seq)} steps in {seconds:.1f} s, loss {first:.3f} → {last:.3f}, weights finite: {finite}"
    c.verdict("train", name, ok, detail)


def check_train(c: Check, data: Path, ckpt: Path) -> None:
    jobs = [(m, p) for m in METHODS for p in PRECISIONS]
    if c.device == "cpu":  # the small run: every method once, each precision once (fp16: its refusal)
        # (cograd at fp32 runs in the resume and torchrun areas)
        jobs = [("ew", "fp32"), ("cograd", "bf16"), ("gdod", "fp32"), ("pcgrad", "fp32"), ("cograd", "fp16")]
    with ThreadPoolExecutor(c.size.parallel) as pool:
        list(pool.map(lambda job: one_training(c, ckpt, data, *job), jobs))


# --- resume after SIGKILL --------------------------------------------------------------------------


def resume_args(c: Check, ckpt: Path, data: Path, out: Path) -> list:
    extra = ["--method", "cograd", "--epochs", 100, "--max-steps", c.size.resume_steps, "--batch-size", c.size.batch]
    return train_args(c, ckpt, data, out, *extra, "--save-every", 10, "--log-every", 10)


def check_resume(c: Check, data: Path, ckpt: Path) -> None:
    reference, killed = c.work / "resume-reference", c.work / "resume-killed"
    with ThreadPoolExecutor(2) as pool:
        ref = pool.submit(lambda: cli(*resume_args(c, ckpt, data, reference), deterministic=True))
        kill = pool.submit(kill_mid_run, c, resume_args(c, ckpt, data, killed), killed)
        ref_proc, at = ref.result(), kill.result()
    if ref_proc.returncode != 0:
        c.verdict("resume", "uninterrupted run", False, f"exit {ref_proc.returncode}: {tail(ref_proc)}")
        return
    if not 0 <= at < c.size.resume_steps:
        c.verdict("resume", "SIGKILL mid-run", False, f"the run was not killed mid-run (saved step {at})")
        return
    proc = cli(*resume_args(c, ckpt, data, killed), deterministic=True)  # the same command
    if proc.returncode != 0:
        c.verdict("resume", "rerun after SIGKILL", False, f"exit {proc.returncode}: {tail(proc)}")
        return
    want, got = weights(reference), weights(killed)
    same = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    detail = f"killed after step {at} of {c.size.resume_steps}; {len(want)} tensors "
    detail += "bit-identical" if same else f"differ, max |Δ| {max_diff(want, got):.3g}"
    c.verdict("resume", "SIGKILL + rerun = uninterrupted (deterministic)", same, detail)


def kill_mid_run(c: Check, args: list, out: Path) -> int:
    """Start the run, SIGKILL it once it has saved step ``kill_after`` → the last saved step (-1: none)."""
    argv, env = command(args, deterministic=True)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while saved_step(out) < c.size.kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:  # finished (or failed) before the kill: not a mid-run kill
        return c.size.resume_steps if proc.returncode == 0 else -1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return saved_step(out)


# --- measure-transference: CUDA against CPU --------------------------------------------------------


def check_measure(c: Check, data: Path) -> None:
    ckpt = c.work / "train-ew-fp32" / "last.safetensors"  # trained: its Adam state makes the lookahead real
    if not ckpt.exists():
        c.verdict("measure", "checkpoint", False, "needs the train area's ew fp32 run")
        return
    common = ["measure-transference", "--checkpoint", ckpt, "--data", data / "valid.parquet"]
    common += ["--batches", c.size.measure_batches, "--batch-size", 256, "--json", "--quiet"]
    if c.device == "cpu":  # no second device: two thread counts, whose reduction orders differ
        runs = {"1 thread": ["--device", "cpu"], "2 threads": ["--device", "cpu"]}
        envs = {"1 thread": {"OMP_NUM_THREADS": "1"}, "2 threads": {"OMP_NUM_THREADS": "2"}}
    else:
        runs = {c.device: ["--device", c.device], "cpu": ["--device", "cpu"]}
        envs = {c.device: {}, "cpu": {}}
    for lookahead in ("sgd", "optimizer") if c.device != "cpu" else ("optimizer",):
        results = {}
        for name, args in runs.items():
            proc = cli(*common, *args, "--lookahead", lookahead, env=envs[name])
            if proc.returncode != 0:
                c.verdict("measure", f"{lookahead} on {name}", False, f"exit {proc.returncode}: {tail(proc)}")
                return
            results[name] = json.loads(proc.stdout)
        a, b = results.values()
        worst = {
            key: float(
                (torch.tensor(a[key], dtype=torch.float64) - torch.tensor(b[key], dtype=torch.float64)).abs().max()
            )
            for key in ("transference", "transference_rel", "cosine", "conflict_rate", "gms")
        }
        largest = max(worst.values())
        se = min(v for row in a["stderr"]["transference_rel"] for v in row if v is not None and v > 0)
        detail = f"{' vs '.join(runs)}, {a['batches']} batches: max |Δ| {largest:.2g} (Z {worst['transference']:.2g}, "
        detail += f"cosine {worst['cosine']:.2g}) ≤ {MEASURE_ATOL:g}; smallest SE of Z_rel {se:.2g}"
        c.verdict("measure", f"lookahead {lookahead}: matrices agree", largest <= MEASURE_ATOL, detail)


# --- torchrun --------------------------------------------------------------------------------------


def check_torchrun(c: Check, data: Path, ckpt: Path) -> None:
    n = torch.cuda.device_count() if c.device == "cuda" else 2
    per_rank, steps = 64, 20
    extra = ["--method", "cograd", "--max-steps", steps, "--data-shards", n]
    many, one = c.work / f"torchrun-{n}", c.work / "torchrun-ref"
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    args = train_args(c, ckpt, data, many, *extra, "--batch-size", per_rank)
    argv, env = command(args, env={"OMP_NUM_THREADS": "1"}, launcher=launch)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    backend = "NCCL" if c.device == "cuda" else "gloo"
    if proc.returncode != 0:
        c.verdict("torchrun", f"{n} process(es), {backend}", False, f"exit {proc.returncode}: {tail(proc)}")
        return
    ref = cli(*train_args(c, ckpt, data, one, *extra, "--batch-size", n * per_rank), env={"OMP_NUM_THREADS": "1"})
    if ref.returncode != 0:
        c.verdict("torchrun", "one process", False, f"exit {ref.returncode}: {tail(ref)}")
        return
    diff = max_diff(weights(many), weights(one))
    detail = f"{steps} cograd steps, global batch {n * per_rank}: max |Δ| weights {diff:.2g} ≤ {DIST_ATOL:g}"
    c.verdict("torchrun", f"{n} process(es), {backend} = one process", diff <= DIST_ATOL, detail)


# --- a model too large -----------------------------------------------------------------------------


def oversized_embedding_dim(c: Check) -> int:
    """An mmoe ``embedding_dim`` whose weights alone take 30% of the GPU (training them needs more
    than all of it: gradients, the K×P matrix, activations); on the CPU, one beyond this machine's budget."""
    from cogradctl import models
    from cogradctl.bench import synthetic_workload

    counts = []
    for dim in (1, 2):
        _, _, net = synthetic_workload("mmoe", 2, 64, {"embedding_dim": dim}, [], torch.device("cpu"))
        counts.append(sum(p.numel() for p in net.parameters()))
    fixed, per_dim = 2 * counts[0] - counts[1], counts[1] - counts[0]
    if c.device == "cpu":
        target = 4 * models.Budget.machine().elements
    else:
        target = int(0.3 * torch.cuda.get_device_properties(0).total_memory / 4)
    return max(1, (target - fixed) // per_dim)


def check_oom(c: Check) -> None:
    dim = oversized_embedding_dim(c)
    proc = cli(
        "bench",
        "--model",
        "mmoe",
        "--synthetic",
        "--config",
        f"embedding_dim={dim}",
        "--methods",
        "cograd",
        "--steps",
        2,
        "--warmup",
        0,
        "--device",
        c.device,
        "--quiet",
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    want = "out of GPU memory" if c.device == "cuda" else "too large for this machine"
    ok = proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and want in lines[0]
    ok = ok and "Traceback" not in proc.stderr
    detail = f"embedding_dim={dim}: exit {proc.returncode}, {len(lines)} stderr line(s): {' | '.join(lines)[:240]}"
    c.verdict("oom", f"oversized --config → exit 2, one line '{want}'", ok, detail)


# --- bench -----------------------------------------------------------------------------------------


def check_bench(c: Check) -> list[str]:
    """``cogradctl bench`` on both models and every K → its Markdown table lines (and target rows)."""
    lines = [
        "| model | K | batch | shared params | floor ms | method | step ms | ÷ ew | ÷ floor (95% interval) | peak MiB |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    wide = ["--config", f"expert={c.size.wide}"]
    models = [("mmoe", [], c.size.bench_batches[0]), ("mmoe wide", wide, c.size.bench_batches[1])]
    for label, config, batch in models if c.device != "cpu" else models[1:]:  # the small run: one model
        for k in c.size.tasks:
            args = ["bench", "--model", "mmoe", "--synthetic", "--num-tasks", k, *config, "--batch-size", batch]
            args += ["--methods", BENCH_METHODS, "--steps", c.size.bench_steps, "--warmup", c.size.bench_warmup]
            proc = cli(*args, "--device", c.device, "--json", "--quiet", timeout=600)
            if not c.verdict(
                "bench", f"{label} K={k}", proc.returncode == 0, f"exit {proc.returncode} {tail(proc, 1)}"
            ):
                continue
            r = json.loads(proc.stdout)
            for name, m in r["methods"].items():
                lo, hi = m["ratio_to_floor_ci95"]
                peak = "" if m["peak_mem_mb"] is None else f"{m['peak_mem_mb']:.0f}"
                lines.append(
                    f"| {label} | {k} | {batch} | {r['shared_parameters']:,} | {r['floor_ms']:.2f} | {name} | "
                    f"{m['step_ms']:.2f} | {m['ratio_to_ew']:.2f} | {m['ratio_to_floor']:.2f} ({lo:.2f}–{hi:.2f}) | {peak} |"
                )
                if c.device == "cuda" and label == "mmoe wide":
                    target(
                        c, f"{name} ÷ floor, wide K={k}", TARGETS.get(name, OTHER_TARGET), m["ratio_to_floor"], lo, hi
                    )
    return lines


def target(c: Check, check: str, limit: float, point: float, lo: float, hi: float) -> None:
    status = "MET" if hi <= limit else "MISSED" if lo > limit else "UNCLEAR"
    c.add("target", check, status, f"{point:.2f} (95% interval {lo:.2f}–{hi:.2f}), target ≤ {limit:.2f}")


# --- CoGrad against torchjd ------------------------------------------------------------------------


def timed(fn, device: torch.device) -> float:
    """ms of one call: CUDA events on the device, else the wall clock."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def check_torchjd(c: Check) -> list[str]:
    try:
        from benchmarks.speed import cograd_and_upgrad_steps  # imports torchjd
    except ImportError as exc:
        c.verdict("torchjd", "import", False, f"torchjd is needed for this area: {exc}")
        return []
    from cogradctl.bench import synthetic_workload
    from cogradctl.models import split_parameters

    device, batch = torch.device(c.device), c.size.bench_batches[1]
    lines = ["| K | batch | cogradctl cograd step ms | torchjd UPGrad step ms | cogradctl ÷ torchjd (95% interval) |"]
    lines.append("|---:|---:|---:|---:|---:|")
    for k in c.size.tasks:
        torch.manual_seed(0)
        schema, data, net = synthetic_workload("mmoe", k, batch, {"expert": c.size.wide}, [], device)
        split = split_parameters(net, schema.task_names, "mmoe")
        inputs, labels = data.batch(slice(0, batch), device)
        ours, theirs, remove = cograd_and_upgrad_steps(net, split, schema, inputs, labels, device)
        times: dict[str, list[float]] = {"ours": [], "torchjd": []}
        for round_ in range(c.size.jd_rounds + 2):
            for name, fn in (("ours", ours), ("torchjd", theirs))[:: 1 if round_ % 2 else -1]:
                elapsed = timed(fn, device)
                if round_ >= 2:
                    times[name].append(elapsed)
        remove()
        lo, hi = ratio_interval(times["ours"], times["torchjd"])
        med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
        point = med["ours"] / med["torchjd"]
        lines.append(f"| {k} | {batch} | {med['ours']:.2f} | {med['torchjd']:.2f} | {point:.2f} ({lo:.2f}–{hi:.2f}) |")
        c.add("torchjd", f"wide K={k}", "INFO", f"cograd {med['ours']:.2f} ms, torchjd {med['torchjd']:.2f} ms")
        if c.device == "cuda":
            target(c, f"cograd step ÷ torchjd UPGrad step, wide K={k}", 1.0, point, lo, hi)
    return lines


# --- the run ---------------------------------------------------------------------------------------


def run(c: Check, areas: list[str]) -> dict[str, list[str]]:
    """Every area asked for, each failure recorded as a FAIL row; → extra Markdown tables by area."""
    tables: dict[str, list[str]] = {}
    try:
        data, ckpt, dropout = setup(c)
    except Exception as exc:  # nothing else can run
        c.verdict("setup", "sample-data + init", False, str(exc))
        return tables
    steps = {
        "train": lambda: check_train(c, data, ckpt),
        "resume": lambda: check_resume(c, data, dropout),
        "measure": lambda: check_measure(c, data),
        "torchrun": lambda: check_torchrun(c, data, ckpt),
        "oom": lambda: check_oom(c),
        "bench": lambda: tables.__setitem__("bench", check_bench(c)),
        "torchjd": lambda: tables.__setitem__("torchjd", check_torchjd(c)),
    }
    if "measure" in areas and "train" not in areas:
        one_training(c, ckpt, data, "ew", "fp32")

    def chain(names: list[str]) -> None:
        for area in names:
            try:
                steps[area]()
            except Exception as exc:
                c.verdict(area, "ran", False, f"{type(exc).__name__}: {exc}")

    # On a GPU one area at a time: the out-of-memory check must have the GPU to itself, and the
    # timings too. On the CPU (the test's small run) independent chains share the cores.
    chains = [[a for a in names if a in areas] for names in CHAINS]
    with ThreadPoolExecutor(1 if c.device == "cuda" else c.size.parallel) as pool:
        list(pool.map(chain, [names for names in chains if names]))
    c.rows.sort(key=lambda r: ROW_ORDER.index(r.area))  # threads append in any order; stable within an area
    return tables


def markdown(c: Check, tables: dict[str, list[str]], seconds: float) -> str:
    lines = [f"Device: {describe_device(torch.device(c.device))}; {seconds:.0f} s in all.", ""]
    lines += ["| area | check | result | detail |", "|---|---|---|---|"]
    cell = str.maketrans({"|": "\\|"})  # a detail's |Δ| must not end its Markdown cell
    lines += [f"| {r.area} | {r.check} | {r.status} | {r.detail.translate(cell)} |" for r in c.rows]
    for name, table in tables.items():
        lines += ["", f"`{name}`:", "", *table]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--only", default=",".join(AREAS), help=f"comma-separated areas: {', '.join(AREAS)}")
    parser.add_argument("--md", type=Path, help="also write the table as Markdown to this file")
    args = parser.parse_args()
    areas = [a for a in args.only.split(",") if a]
    unknown = sorted(set(areas) - set(AREAS))
    if unknown:
        parser.error(f"--only: unknown area(s) {', '.join(unknown)}; known: {', '.join(AREAS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for the small run)")
    if args.device == "cpu":  # two runs at a time on a small machine: one thread each, no oversubscription
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        c = Check(args.device, Path(tmp), SIZES[args.device])
        tables = run(c, areas)
    text = markdown(c, tables, time.perf_counter() - start)
    sys.stdout.write(text)
    if args.md:
        args.md.write_text(text)
    statuses = {r.status for r in c.rows}
    return 1 if "FAIL" in statuses else 3 if "MISSED" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())
