"""Per-step cost of each gradient method against the floor, on the user's model and data.

The floor of one step with K tasks is what any gradient-manipulation method must do: one forward
pass and K backward passes onto the shared parameters (and each task's own parameters). A method's
step is exactly what ``train`` runs (``train.train_step``: the floor's work, plus writing the
gradients into the K×P matrix, the method's maths and the optimizer step); everything above the
floor is the tool's overhead. ``ew`` is timed the same way, and a plain single-backward step on the
summed loss is reported as ``plain`` for reference. Timings: median and interquartile spread of
``steps`` steps after ``warmup`` steps, all candidates interleaved on the same batches and weights;
on CUDA timed with CUDA events, with per-candidate peak allocated memory. Each ratio to the floor
comes with a 95% bootstrap interval over the rounds (``ratio_interval``), so a reader can tell a
real difference from the machine's noise. With row-sparse embedding tables (``embeddings``, as
``train --embeddings``) the floor's backward passes give the tables their sparse gradients.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch

from cogradctl import tables
from cogradctl.data import Dataset
from cogradctl.methods import get_method
from cogradctl.models import ParamSplit
from cogradctl.schema import Schema
from cogradctl.taskgrad import TaskGradients, task_losses
from cogradctl.train import TrainConfig, make_optimizer, optimizer_step, train_step, trainable
from cogradctl.transference import DEFAULT_LOOKAHEAD_LR, measure_batch

ID_FEATURES = ("user_id", "item_id")  # synthetic_workload's hashed id features (table_rows)


def _stats(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "min_ms": min(times)}


def ratio_interval(
    num: list[float], den: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> list[float]:
    """Bootstrap interval of median(num) / median(den) for times taken in the same rounds.

    Rounds are resampled with replacement, the same rounds for both (a slow spell of the machine
    slows both sides of a round), and the ratio of medians is recomputed; the interval is the
    central ``level`` of those ratios. It says which differences a run can resolve: on a quiet
    machine it is a few per cent wide, on a busy one much wider.
    """
    import numpy as np

    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError("ratio_interval needs two equally long series of at least 2 times")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    tail = (1.0 - level) / 2.0
    return [float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1.0 - tail))]


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"{cpu_model()} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def synthetic_workload(
    model: str,
    num_tasks: int,
    rows: int,
    config: dict,
    plugin_paths: list[str],
    device,
    seed=0,
    table_rows: int | None = None,
):
    """A fresh ``model`` plugin on ``rows`` rows of generated sample data with ``num_tasks`` binary
    tasks (task0 the anchor, the others of relatedness 0.5; positive rate 0.2): → (schema, dataset,
    model built on ``device``).

    ``table_rows``: two id features more, ``user_id`` and ``item_id``, uniformly drawn 40-bit
    integers hashed into ``table_rows`` rows each (``--encoding COL=hash:N``, as
    benchmarks/embeddings.py builds its checkpoints): a batch touches about one distinct row per
    row of the batch in each, the worst case for the row-sparse path (no repeats)."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import pyarrow as pa

    from cogradctl import data as data_io
    from cogradctl import models, sample
    from cogradctl.encodings import parse_specs
    from cogradctl.infer import SchemaOptions, infer_from_options

    tasks = {f"task{k}": (1.0 if k == 0 else 0.5, 0.2) for k in range(num_tasks)}
    table = sample.generate(rows, tasks, seed=seed)
    encodings = []
    if table_rows is not None:
        ids = np.random.default_rng([seed, 0x1D5])
        for name in ID_FEATURES:
            table = table.append_column(name, pa.array(ids.integers(0, 1 << 40, size=rows), pa.int64()))
            encodings.append(f"{name}=hash:{table_rows}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.parquet"
        sample.write(table, path)
        opts = SchemaOptions(list(tasks), encodings=parse_specs(encodings))
        schema, _, _ = infer_from_options(str(path), opts)
        dataset = data_io.load(str(path), schema)
    with torch.device(device):  # built where it runs: no host copy of a large model, GPU initialisation
        net, _ = models.build(model, schema, config, plugin_paths)
    net.to(device)
    return schema, dataset, net


def bench(
    model: torch.nn.Module,
    split: ParamSplit,
    schema: Schema,
    data: Dataset,
    methods: list[str],
    method_options: dict[str, dict] | None = None,
    batch_size: int = 2048,
    steps: int = 20,
    warmup: int = 3,
    device: torch.device = torch.device("cpu"),
    progress=None,
    embeddings: str = "dense",
) -> dict:
    """Time the floor, a plain step, each method's training step and a measure-transference batch.

    Runs are interleaved: each round times one step of every candidate in turn, in an order that
    rotates from round to round, so that a noisy, shared machine slows them all alike. The
    optimizer's learning rate is 0, so the weights (and hence every candidate's work) stay
    identical across rounds. ``progress(n)``, if given, is called after each round.

    ``embeddings``: the resolved ``train --embeddings`` mode (:mod:`cogradctl.tables`; ``dense``
    changes nothing). In ``coordinate`` and ``sum`` the tables are taken out of ``split.shared`` as
    ``train`` does, the floor's K backward passes give them their sparse gradients too, the plain
    step and the methods' steps update their touched rows (``optim.lazy_step``), and the
    measure-transference batch is not timed (``measure_transference`` None: bench times the row-sparse training step).
    """
    n_batches = max(1, min(len(data) // batch_size, 8))
    batches = [data.batch(slice(b * batch_size, (b + 1) * batch_size), device) for b in range(n_batches)]
    model.train()
    found = tables.embedding_tables(model, split)  # before separate: the tables as the model holds them
    tables.separate(model, split, embeddings)
    candidates, grads = _candidates(model, split, schema, methods, method_options or {}, device, embeddings)
    times, peaks = _time_rounds(candidates, batches, warmup, steps, device, progress or (lambda n=1: None))
    result = _report(times, peaks, methods, schema, split, batch_size, steps, device)
    result["embeddings"] = _tables_report(found, embeddings, grads)
    return result


def _candidates(
    model,
    split: ParamSplit,
    schema: Schema,
    methods: list[str],
    method_options: dict[str, dict],
    device: torch.device,
    embeddings: str = "dense",
) -> tuple[dict, TaskGradients]:
    """What is timed, by name: the floor, a plain step, ``method:<name>`` for each method's
    training step, and (without row-sparse tables) a measure-transference batch with its own
    floor; and the TaskGradients the methods' steps use."""
    k = len(schema.tasks)
    names = schema.task_names
    grads = TaskGradients(model, split, schema, device, sum_tables=embeddings == "sum")
    params, _ = trainable(model, split, torch.nn.Module())  # as train's: the shared parameters flat
    config = TrainConfig(checkpoint="", data="", out="", lr=0.0)
    optimizer = make_optimizer(config, params, len(split.tables))

    def floor(inputs, labels) -> None:  # one forward, K backward passes onto shared + own parameters
        losses = task_losses(model(inputs), labels, schema)
        for i, task in enumerate(names):  # row-sparse tables (split.tables): their sparse gradients
            params = [*split.shared, *split.tables, *split.tasks[task]]
            torch.autograd.grad(losses[i], params, retain_graph=i < k - 1, allow_unused=True)

    def plain(inputs, labels) -> None:  # ordinary training on the summed loss
        optimizer.zero_grad(set_to_none=True)
        task_losses(model(inputs), labels, schema).sum().backward()
        if not split.tables:
            optimizer.step()
            return
        for table in split.tables:  # one entry per lookup: summed per row, as lazy_step takes it
            if table.grad is not None:
                table.grad = table.grad.coalesce()
        optimizer_step(optimizer)

    def method_step(method):
        def run(inputs, labels) -> None:
            train_step(grads, method, optimizer, inputs, labels)

        return run

    def measure(inputs, labels) -> None:
        measure_batch(model, split, schema, grads, inputs, labels, DEFAULT_LOOKAHEAD_LR)

    def measure_floor(inputs, labels) -> None:  # the floor plus K forwards
        floor(inputs, labels)
        with torch.no_grad():
            for _ in range(k):
                task_losses(model(inputs), labels, schema)

    candidates = {"floor": floor, "plain": plain}
    for name in methods:
        method = get_method(name, **method_options.get(name, {})).to(device)
        method.setup(k)
        method.segments = [p.numel() for p in split.shared]
        if list(method.parameters()):
            optimizer.add_param_group({"params": list(method.parameters())})
        candidates[f"method:{name}"] = method_step(method)
    if not split.tables:
        candidates["measure"] = measure
        candidates["measure_floor"] = measure_floor
    return candidates, grads


def _tables_report(found: list, mode: str, grads: TaskGradients) -> dict | None:
    """The embedding tables the bench ran with (None if the model has none): each table's rows and
    dim, the mode, their numbers, what they and two Adam moments take (MiB, float32 as stored),
    and the rows the last step touched (row-sparse modes)."""
    if not found:
        return None
    numbers = sum(m.weight.numel() for _, m in found)
    touched = sum(int(ids.numel()) for ids in grads.tables.index) if grads.tables is not None else None
    return {
        "mode": mode,
        "tables": [{"name": n, "rows": m.num_embeddings, "dim": m.embedding_dim} for n, m in found],
        "numbers": numbers,
        "tables_and_adam_mb": 3 * found[0][1].weight.element_size() * numbers / 2**20,
        "touched_rows": touched,
    }


def _time_rounds(
    candidates: dict, batches: list, warmup: int, steps: int, device: torch.device, progress
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each candidate's time (ms) in each of ``steps`` rounds after ``warmup``, and its peak GPU memory (MiB)."""
    times: dict[str, list[float]] = {c: [] for c in candidates}
    peaks: dict[str, float] = {c: 0.0 for c in candidates}
    order = list(candidates.items())
    for round_ in range(warmup + steps):
        inputs, labels = batches[round_ % len(batches)]
        # The order rotates every round: no candidate always runs right after the same other one
        # (caches, allocator state and clock boost then affect every candidate alike).
        shift = round_ % len(order)
        for cand, fn in order[shift:] + order[:shift]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            elapsed = _time_one(fn, inputs, labels, device)
            if round_ >= warmup:
                times[cand].append(elapsed)
            if device.type == "cuda":
                peaks[cand] = max(peaks[cand], torch.cuda.max_memory_allocated(device) / 2**20)
        progress(1)
    return times, peaks


def _time_one(fn, inputs, labels, device: torch.device) -> float:
    """ms of one call: CUDA events on the device, else the wall clock."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn(inputs, labels)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    start = time.perf_counter()
    fn(inputs, labels)
    return (time.perf_counter() - start) * 1000.0


def _report(
    times: dict[str, list[float]],
    peaks: dict[str, float],
    methods: list[str],
    schema: Schema,
    split: ParamSplit,
    batch_size: int,
    steps: int,
    device: torch.device,
) -> dict:
    stats = {c: _stats(t) for c, t in times.items()}
    floor_ms = stats["floor"]["median_ms"]
    ew_ms = stats["method:ew"]["median_ms"] if "ew" in methods else None
    return {
        "device": describe_device(device),
        "tasks": len(schema.tasks),
        "batch_size": batch_size,
        "steps": steps,
        "shared_parameters": split.num_shared,
        "floor_ms": floor_ms,
        "floor_spread_ms": [stats["floor"]["p25_ms"], stats["floor"]["p75_ms"]],
        "plain_ms": stats["plain"]["median_ms"],
        # CPU has no per-method allocator statistics: the process's peak RSS is reported once.
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "methods": {
            name: {
                "step_ms": stats[f"method:{name}"]["median_ms"],
                "spread_ms": [stats[f"method:{name}"]["p25_ms"], stats[f"method:{name}"]["p75_ms"]],
                "ratio_to_ew": stats[f"method:{name}"]["median_ms"] / ew_ms if ew_ms else None,
                "ratio_to_floor": stats[f"method:{name}"]["median_ms"] / floor_ms,
                "ratio_to_floor_ci95": ratio_interval(times[f"method:{name}"], times["floor"]),
                "peak_mem_mb": peaks[f"method:{name}"] if device.type == "cuda" else None,
            }
            for name in methods
        },
        "measure_transference": {
            "batch_ms": stats["measure"]["median_ms"],
            "floor_ms": stats["measure_floor"]["median_ms"],
            "ratio_to_floor": stats["measure"]["median_ms"] / stats["measure_floor"]["median_ms"],
            "ratio_to_floor_ci95": ratio_interval(times["measure"], times["measure_floor"]),
        }
        if "measure" in times
        else None,
    }
