"""Speed benchmarks of issue #7; writes docs/benchmarks.md (never edit that file by hand).

    python benchmarks/speed.py [--threads 1,2] [--steps 20] [--out docs/benchmarks.md]

1. `cogradctl bench` (the user-facing command) on the built-in mmoe, batch 2048, K = 2 and 4:
   each method's training step against the floor (one forward + K backward passes), once per
   thread count of `--threads` (default: 1 and torch's default on the machine, the count a user's
   run gets); then the K = 2 floor with and without cogradctl's glibc allocator settings
   (`cogradctl/allocator.py`), at the first thread count. Sections 2-5 run in this process at the
   first thread count.
2. The aggregation alone (K×P matrix → update) against torchjd's aggregator of the same name,
   P = 1M, K = 2, 4, 8, both timed interleaved on the same matrix.
3. A full CoGrad training step against a torchjd `mtl_backward` + `jac_to_grad(UPGrad)` step on
   the same model and batch.
4. Per-task gradients: K backward passes (used) against one batched backward (is_grads_batched).
5. The representation trick (MGDA-UB) against the floor.

Every comparison is measured side by side in one run (candidates interleaved round by round), so
the ratios hold on a noisy shared machine even when absolute times drift; each ratio comes with a
95% bootstrap interval over the rounds (`cogradctl.bench.ratio_interval`). Needs torchjd
(`pip install -e ".[dev]"`).
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

MANIPULATION = ["cograd", "gdod", "pcgrad", "mgda", "cagrad", "imtl-g", "aligned-mtl", "gradvac", "nash-mtl"]
TORCHJD_PAIRS = {  # ours → torchjd aggregator factory
    "pcgrad": lambda a: a.PCGrad(),
    "mgda": lambda a: a.MGDA(),
    "cagrad": lambda a: a.CAGrad(c=0.5),
    "imtl-g": lambda a: a.IMTLG(),
    "aligned-mtl": lambda a: a.AlignedMTL(),
    "gradvac": lambda a: a.GradVac(),
    "nash-mtl": lambda a: a.NashMTL(n_tasks=0),
}


def machine() -> str:
    from cogradctl.bench import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s), Python {platform.python_version()}"


def interleaved(candidates: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Times (ms) of each candidate, one call of each in turn per round; the order rotates every
    round, so no candidate always runs right after the same other one (caches, clocks)."""
    times = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(warmup + rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = candidates[name]
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def med(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(times[name])


def ratio(times: dict[str, list[float]], num: str, den: str) -> str:
    """median(num) / median(den) with its 95% bootstrap interval over the rounds, as table text."""
    from cogradctl.bench import ratio_interval

    lo, hi = ratio_interval(times[num], times[den])
    return f"{med(times, num) / med(times, den):.2f} ({lo:.2f}–{hi:.2f})"


INTERVAL_NOTE = (
    "Ratios are medians over the rounds with a 95% bootstrap interval in brackets (rounds resampled, "
    "both sides of a round together): what a ratio can tell apart on this machine at the time of the run."
)


def run_bench(k: int, steps: int, methods: list[str], threads: int, **env: str) -> tuple[list[str], dict]:
    """``cogradctl bench`` on the built-in mmoe, batch 2048, as a subprocess: (its command without
    ``--json --quiet``, for the document; its JSON)."""
    cmd = [
        "cogradctl",
        "bench",
        "--model",
        "mmoe",
        "--synthetic",
        "--num-tasks",
        str(k),
        "--batch-size",
        "2048",
        "--steps",
        str(steps),
        "--methods",
        ",".join(methods),
        "--device",
        "cpu",
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env}
    out = subprocess.run([*cmd, "--json", "--quiet"], check=True, capture_output=True, text=True, env=full_env).stdout
    return cmd, json.loads(out)


def section_bench(steps: int, thread_counts: list[int], default_threads: int) -> list[str]:
    lines = ["## 1. `cogradctl bench`: training step ÷ floor (mmoe, batch 2048)", ""]
    for threads in thread_counts:
        if len(thread_counts) > 1:
            default = " (torch's default on this machine)" if threads == default_threads else ""
            lines += [f"### {threads} thread{'s' if threads > 1 else ''}{default}", ""]
        lines += bench_tables(steps, threads)
    return lines + [
        INTERVAL_NOTE + " ✓/✗ compare the median ratio with the target.",
        "",
        *allocator_lines(steps, thread_counts[0]),
        "",
    ]


def bench_tables(steps: int, threads: int) -> list[str]:
    """K = 2 and 4: each method's step ÷ floor with ``threads`` torch threads (OMP_NUM_THREADS)."""
    lines = []
    for k in (2, 4):
        cmd, doc = run_bench(k, steps, ["ew", *MANIPULATION], threads)
        lines += [
            f"K = {k}, {doc['shared_parameters']} shared parameters; floor {doc['floor_ms']:.2f} ms, "
            f"plain single-backward step {doc['plain_ms']:.2f} ms. Command: `OMP_NUM_THREADS={threads} {' '.join(cmd)}`",
            "",
            "| method | step ms | ÷ ew | ÷ floor (95% interval) | target |",
            "|---|---:|---:|---:|---|",
        ]
        for name, r in doc["methods"].items():
            target = "≤ 1.10" if name in ("cograd", "gdod") else ("≤ 1.25" if name != "ew" else "")
            lo, hi = r["ratio_to_floor_ci95"]
            mark = "" if not target else (" ✓" if r["ratio_to_floor"] <= float(target[2:]) else " ✗")
            lines.append(
                f"| {name} | {r['step_ms']:.2f} | {r['ratio_to_ew']:.2f} | {r['ratio_to_floor']:.2f} ({lo:.2f}–{hi:.2f}) | {target}{mark} |"
            )
        m = doc["measure_transference"]
        lo, hi = m["ratio_to_floor_ci95"]
        lines += [
            "",
            f"measure-transference, one batch: {m['batch_ms']:.2f} ms = {m['ratio_to_floor']:.2f} ({lo:.2f}–{hi:.2f}) × its floor "
            f"(one forward, K backward, K forwards: {m['floor_ms']:.2f} ms).",
            "",
        ]
    return lines


def allocator_lines(steps: int, threads: int) -> list[str]:
    """The K = 2 floor with cogradctl's glibc settings and with glibc's defaults (``COGRADCTL_MALLOPT=0``):
    the same `bench --methods ew` run alternately with and without, twice each (a process-wide
    setting cannot be interleaved within one run)."""
    runs: dict[str, list[dict]] = {"1": [], "0": []}
    for setting in ("1", "0", "1", "0"):
        cmd, doc = run_bench(2, steps, ["ew"], threads, COGRADCTL_MALLOPT=setting)
        runs[setting].append(doc)
    lines = [
        "### glibc allocator settings",
        "",
        f"Floor of K = 2 with and without `cogradctl/allocator.py` (freed memory kept in the process, so a step does not "
        f"fault its pages in again); `OMP_NUM_THREADS={threads} [COGRADCTL_MALLOPT=0] {' '.join(cmd)}`, run alternately, twice each.",
        "",
        "| allocator | floor ms | floor p25–p75 ms | plain step ms |",
        "|---|---:|---:|---:|",
    ]
    for setting, label in (("1", "cogradctl's settings"), ("0", "glibc defaults (`COGRADCTL_MALLOPT=0`)")):
        for doc in runs[setting]:
            lo, hi = doc["floor_spread_ms"]
            lines.append(f"| {label} | {doc['floor_ms']:.2f} | {lo:.2f}–{hi:.2f} | {doc['plain_ms']:.2f} |")
    return lines


def section_aggregators(rounds: int, placements: int = 3) -> list[str]:
    import torchjd.aggregation as agg

    from cogradctl.methods import get_method

    lines = [
        "## 2. Aggregation alone against torchjd (P = 1,000,000)",
        "",
        f"Median ms of one call on the same random K×P float32 matrix (losses all 1), interleaved; the rounds of "
        f"{placements} matrices at different addresses pooled (a spacer allocation moves each one: where the matrix "
        "lies changed each side's time by 10–25% in side-by-side runs, so one matrix is one sample of that).",
        "",
        "| method | K | cogradctl ms | torchjd ms | cogradctl ÷ torchjd (95% interval) |",
        "|---|---:|---:|---:|---:|",
    ]
    gen = torch.Generator().manual_seed(0)
    spacers = []
    for k in (2, 4, 8):
        losses = torch.ones(k)
        pooled = {name: {"ours": [], "torchjd": []} for name in TORCHJD_PAIRS}
        for placement in range(placements):
            spacers.append(torch.empty(placement * 123_457 + 1))
            g = torch.randn(k, 1_000_000, generator=gen)
            for name, make in TORCHJD_PAIRS.items():
                ours = get_method(name)
                theirs = make(agg) if name != "nash-mtl" else agg.NashMTL(n_tasks=k)
                ours(g, losses)
                times = interleaved(
                    {"ours": lambda: ours(g, losses), "torchjd": lambda: theirs(g)}, max(1, rounds // placements)
                )
                for side, values in times.items():
                    pooled[name][side] += values
        for name, times in pooled.items():
            lines.append(
                f"| {name} | {k} | {med(times, 'ours'):.2f} | {med(times, 'torchjd'):.2f} | {ratio(times, 'ours', 'torchjd')} |"
            )
    return lines + ["", INTERVAL_NOTE, ""]


def _mmoe(k: int, rows: int = 4096):
    from cogradctl import data as data_io
    from cogradctl import models, sample

    tasks = {f"task{i}": (1.0 if i == 0 else 0.5, 0.2) for i in range(k)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.parquet"
        sample.write(sample.generate(rows, tasks, seed=0), path)
        schema, _ = data_io.infer_schema(str(path), list(tasks), {t: "binary" for t in tasks})
        data = data_io.load(str(path), schema)
    torch.manual_seed(0)
    net, _ = models.build("mmoe", schema, {})
    return net, models.split_parameters(net, schema.task_names, "mmoe"), schema, data


def cograd_and_upgrad_steps(net, split, schema, inputs, labels, device=None):
    """Two training steps on the same mmoe, batch and Adam (lr 0: identical weights every call):
    cogradctl's CoGrad step and torchjd's ``mtl_backward`` + ``jac_to_grad(UPGrad)`` step. torchjd's
    features are the outputs of the shared modules the task heads read (the input layer and each
    expert), captured with forward hooks. → (ours, theirs, remove): ``remove()`` drops the hooks."""
    import torchjd.aggregation as agg
    from torchjd.autojac import jac_to_grad, mtl_backward

    from cogradctl.methods import get_method
    from cogradctl.taskgrad import TaskGradients, task_losses
    from cogradctl.train import train_step

    device = device or torch.device("cpu")
    k = len(schema.task_names)
    opt = torch.optim.Adam(net.parameters(), lr=0.0)
    method = get_method("cograd").to(device)
    method.setup(k)
    method.segments = [p.numel() for p in split.shared]
    grads = TaskGradients(net, split, schema, device)
    features: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: features.append(o)) for m in (net.input, *net.experts)]
    upgrad = agg.UPGrad()
    own = [split.tasks[t] for t in schema.task_names]

    def ours():
        features.clear()
        train_step(grads, method, opt, inputs, labels)

    def theirs():
        features.clear()
        opt.zero_grad(set_to_none=True)
        losses = task_losses(net(inputs), labels, schema)
        # retain_graph: the features overlap (the experts read the input layer), which torchjd
        # differentiates in separate passes.
        mtl_backward(
            list(losses), features=list(features), tasks_params=own, shared_params=split.shared, retain_graph=True
        )
        jac_to_grad(split.shared, upgrad)
        opt.step()

    def remove():
        for h in hooks:
            h.remove()

    return ours, theirs, remove


def section_full_step(rounds: int) -> list[str]:
    lines = [
        "## 3. Full training step: CoGrad against torchjd `mtl_backward` + `jac_to_grad(UPGrad)`",
        "",
        "Same mmoe, same batch of 2048 rows, Adam with learning rate 0 (identical weights every round). torchjd's "
        "features are the outputs of the shared modules the task heads read (the input layer and each expert), "
        "captured with forward hooks; its step then backpropagates the aggregated gradient into the shared parameters.",
        "",
        "| K | cogradctl cograd step ms | torchjd UPGrad step ms | cogradctl ÷ torchjd (95% interval) |",
        "|---:|---:|---:|---:|",
    ]
    for k in (2, 4):
        net, split, schema, data = _mmoe(k)
        inputs, labels = data.batch(slice(0, 2048))
        ours, theirs, remove = cograd_and_upgrad_steps(net, split, schema, inputs, labels)
        times = interleaved({"ours": ours, "torchjd": theirs}, rounds)
        remove()
        lines.append(
            f"| {k} | {med(times, 'ours'):.2f} | {med(times, 'torchjd'):.2f} | {ratio(times, 'ours', 'torchjd')} |"
        )
    return lines + [""]


def section_backward(rounds: int) -> list[str]:
    from cogradctl.taskgrad import TaskGradients, task_losses

    lines = [
        "## 4. Per-task gradients: K backward passes against one batched backward",
        "",
        "`torch.autograd.grad(losses, shared, grad_outputs=I_K, is_grads_batched=True)` (vmap over the backward) "
        "against the K passes `TaskGradients` makes, mmoe, batch 2048. The faster one is what the engine uses.",
        "",
        "| K | K passes ms | batched ms | batched ÷ passes (95% interval) |",
        "|---:|---:|---:|---:|",
    ]
    for k in (2, 4):
        net, split, schema, data = _mmoe(k)
        inputs, labels = data.batch(slice(0, 2048))
        tg = TaskGradients(net, split, schema)

        def batched():
            losses = task_losses(net(inputs), labels, schema)
            torch.autograd.grad(losses, split.shared, grad_outputs=torch.eye(k), is_grads_batched=True)

        times = interleaved({"loop": lambda: tg(inputs, labels), "batched": batched}, rounds)
        lines.append(
            f"| {k} | {med(times, 'loop'):.2f} | {med(times, 'batched'):.2f} | {ratio(times, 'batched', 'loop')} |"
        )
    return lines + [""]


def _out_width(expert: torch.nn.Module) -> int:
    return [m for m in expert.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


def section_representation(rounds: int) -> list[str]:
    """MGDA-UB's trick on mmoe: K cheap backward passes to the shared representation (the input
    layer's output and each expert's output, made leaves by forward hooks), min-norm weights from
    the Gram of those gradients, one backward through the shared modules."""
    from cogradctl.methods.base import gram
    from cogradctl.methods.mgda import min_norm_weights
    from cogradctl.taskgrad import task_losses

    lines = [
        "## 5. The representation trick (MGDA-UB) against K backward passes",
        "",
        "Per-task gradients with respect to the shared representation (the input layer's and each expert's "
        "outputs), the min-norm weights from their Gram matrix, then one backward through the shared modules; "
        "against the floor (one forward, K backward passes onto the shared parameters), mmoe, batch 2048.",
        "",
        "| K | floor ms | representation trick ms | trick ÷ floor (95% interval) |",
        "|---:|---:|---:|---:|",
    ]
    ratios = []
    for k in (2, 4):
        net, split, schema, data = _mmoe(k)
        inputs, labels = data.batch(slice(0, 2048))
        own = {t: split.tasks[t] for t in schema.task_names}
        originals: dict[str, list[torch.Tensor]] = {"x": [], "e": []}
        leaves: dict[str, list[torch.Tensor]] = {"x": [], "e": []}

        def cut(kind):
            def hook(module, args, output):
                originals[kind].append(output)
                leaf = output.detach().requires_grad_()
                leaves[kind].append(leaf)
                return leaf

            return hook

        hooks = [net.input.register_forward_hook(cut("x"))] + [e.register_forward_hook(cut("e")) for e in net.experts]
        expert_params = [p for e in net.experts for p in e.parameters()]

        def trick():
            for v in (*originals.values(), *leaves.values()):
                v.clear()
            losses = task_losses(net(inputs), labels, schema)
            reps = [leaves["x"][0], *leaves["e"]]
            rows = []
            for i, task in enumerate(schema.task_names):
                got = torch.autograd.grad(losses[i], [*reps, *own[task]], retain_graph=i < k - 1, allow_unused=True)
                rows.append(
                    torch.cat(
                        [
                            torch.zeros_like(r).reshape(-1) if g is None else g.reshape(-1)
                            for r, g in zip(reps, got[: len(reps)])
                        ]
                    )
                )
            z = torch.stack(rows)
            alpha, _ = min_norm_weights(gram(z))
            cot = alpha.to(z) @ z
            sizes = [r.numel() for r in reps]
            parts = list(torch.split(cot, sizes))
            # experts: their parameters, and the input through them; then the input layer
            e_out = originals["e"]
            grads = torch.autograd.grad(
                e_out,
                [*expert_params, leaves["x"][0]],
                grad_outputs=[c.view_as(o) for c, o in zip(parts[1:], e_out)],
                allow_unused=True,
            )
            x_cot = parts[0].view_as(originals["x"][0]) + (grads[-1] if grads[-1] is not None else 0)
            torch.autograd.backward(originals["x"][0], grad_tensors=x_cot)

        def floor():
            for v in (*originals.values(), *leaves.values()):
                v.clear()
            for h in hooks:
                h.remove()
            losses = task_losses(net(inputs), labels, schema)
            for i, task in enumerate(schema.task_names):
                torch.autograd.grad(losses[i], [*split.shared, *own[task]], retain_graph=i < k - 1, allow_unused=True)
            hooks[:] = [net.input.register_forward_hook(cut("x"))] + [
                e.register_forward_hook(cut("e")) for e in net.experts
            ]

        times = interleaved({"floor": floor, "trick": trick}, rounds)
        for h in hooks:
            h.remove()
        rep_size = 2048 * (net.input.out_dim + sum(_out_width(e) for e in net.experts))
        ratios.append(med(times, "trick") / med(times, "floor"))
        lines.append(
            f"| {k} | {med(times, 'floor'):.2f} | {med(times, 'trick'):.2f} | {ratio(times, 'trick', 'floor')} |"
        )
    verdict = (
        f"The trick saved {100 * (1 - max(ratios)):.0f}–{100 * (1 - min(ratios)):.0f} % here"
        if max(ratios) < 1
        else f"The trick did not pay here (up to {max(ratios):.2f} × the floor)"
    )
    lines += [
        "",
        f"{verdict}: it skips K − 1 backward passes through the experts and embeddings but carries per-task "
        f"gradients of the representation, {rep_size:,} values each against {split.num_shared:,} shared parameters, "
        "so it gains most where the shared part is large and what the heads read is small. It is exact only for "
        "methods defined on the Gram matrix of the representation gradients (MGDA-UB); CoGrad, GDOD and the other "
        "methods are defined on the parameter gradients, where it would change the method, so the engine keeps K "
        "backward passes onto the parameters. It is the speed-up a future `mgda-ub` method would get.",
        "",
    ]
    return lines


def gpu_section(path: Path) -> list[str]:
    """The GPU section (``## GPU…`` to the end) of the existing file: this CPU run cannot redo it."""
    if not path.exists():
        return []
    old = path.read_text().splitlines()
    start = next((i for i, line in enumerate(old) if line.startswith("## GPU")), None)
    return [] if start is None else ["", *old[start:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_threads = torch.get_num_threads()
    parser.add_argument(
        "--threads",
        default=",".join(dict.fromkeys(["1", str(default_threads)])),
        help="comma-separated torch thread counts, one section-1 table set each; sections 2-5 use the "
        f"first (default: 1 and torch's default here, {default_threads})",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps/rounds per candidate")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    try:
        thread_counts = list(dict.fromkeys(int(t) for t in args.threads.split(",")))
    except ValueError:
        thread_counts = []
    if not thread_counts or min(thread_counts) < 1:
        parser.error(f"--threads {args.threads!r}: expected comma-separated positive integers, e.g. 1,2")
    torch.set_num_threads(thread_counts[0])
    from cogradctl.allocator import keep_freed_memory

    keep_freed_memory()  # as the cogradctl command does, for the in-process sections
    started = time.time()
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/speed.py "
        f"--threads {','.join(map(str, thread_counts))} --steps {args.steps}` — do not edit by hand.",
        "",
        f"Machine: {machine()}; section 1 at {' and '.join(map(str, thread_counts))} thread(s) (torch's default "
        f"here: {default_threads}), sections 2-5 at {thread_counts[0]}. This run is CPU only; the GPU rows are the last section's, written by "
        "`benchmarks/gpu_check.py` on a GPU machine (kept as they are when this file is regenerated).",
        "",
    ]
    lines += section_bench(args.steps, thread_counts, default_threads)
    lines += section_aggregators(max(5, 2 * args.steps))  # sub-ms calls: more rounds for a steadier median
    lines += section_full_step(args.steps)
    lines += section_backward(args.steps)
    lines += section_representation(args.steps)
    lines.append(f"Total benchmark time {time.time() - started:.0f} s.")
    lines += gpu_section(args.out)
    from cogradctl.atomic_files import atomic_write_bytes

    atomic_write_bytes(args.out, ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
