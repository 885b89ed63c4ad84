"""The training loop: fine-tune a checkpoint with a gradient method, evaluate, save, resume.

One step: a forward pass, K backward passes giving the K×P matrix of task gradients on the shared
parameters (and each task's gradient on its own parameters), the method's update written into the
shared parameters' ``.grad``, each task's own gradients scaled by the method's task weight, and an
optimizer step (``train_step``).

Outputs in ``out``: ``last.safetensors`` (the latest weights, plus everything needed to resume:
optimizer and method state, RNG state, position in the data), ``best.safetensors`` (best
validation score), ``metrics.jsonl`` (one JSON object per logged step or evaluation),
``config.toml`` (the effective configuration) and, while running, ``.lock``.

Data stream from Parquet (``cogradctl.stream``): memory stays bounded whatever the data size. Resume
is exact: the order of the data in epoch e depends only on (seed, e), the learning rate only on the
step, and the rest is in the saved state, so a run killed at any point and resumed ends with the
same weights as an uninterrupted one (bit-identical on CPU with the same seed).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.optim.adam import adam as functional_adam

from cogradctl import checkpoint as ckpt_io
from cogradctl import data as data_io
from cogradctl.console import Log
from cogradctl.distributed import Dist, StepReducer, process_group
from cogradctl.errors import DataError, Diverged, Stopped, UsageError
from cogradctl.evaluate import evaluate, mean_auc
from cogradctl.methods import get_method
from cogradctl.models import ParamSplit, build, split_parameters
from cogradctl.stream import ParquetStream
from cogradctl.taskgrad import TaskGradients, flatten_shared, set_shared_grad, unflatten_shared

OUTPUTS = ("last.safetensors", "best.safetensors", "metrics.jsonl")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
# Changing these between a run and its resumption would make the result something else.
RESUME_KEYS = ("checkpoint", "data", "method", "method_options", "optimizer", "lr", "weight_decay", "momentum",
               "grad_clip", "warmup_steps", "schedule", "epochs", "max_steps", "seed", "precision",
               "on_invalid_rows", "shuffle_buffer")


@dataclass
class TrainConfig:
    """Every option of ``cogradctl train`` (a ``--config`` TOML file uses the same flat keys)."""

    checkpoint: str
    data: str
    out: str
    method: str = "ew"
    method_options: dict = field(default_factory=dict)
    valid: str | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    grad_clip: float | None = None  # max global norm of the final gradients
    warmup_steps: int = 0
    schedule: str = "constant"
    batch_size: int = 1024  # per process
    data_shards: int | None = None  # default: one per process (or the resumed run's)
    epochs: int = 1
    max_steps: int | None = None
    eval_every: int | None = None  # steps; evaluation also runs at every epoch end and after the last step
    early_stopping: int | None = None  # evaluations without improvement before stopping
    save_every: int | None = None  # steps; state is also saved at every epoch end
    precision: str = "fp32"
    on_nonfinite: str = "abort"
    on_invalid_rows: str = "error"  # or "drop": rows with NaN/inf/missing labels or features
    shuffle_buffer: int = 65536  # rows held for shuffling, beyond file and row-group order
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    measure_every: int | None = None  # every N steps: transference on a few fixed training batches
    tensorboard: bool = False
    overwrite: bool = False
    resume: bool = False

    def check(self) -> None:
        for name in ("lr", "batch_size", "epochs", "log_every"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("data_shards", "max_steps", "eval_every", "early_stopping", "save_every", "measure_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{_flag(name)} must be positive, got {value}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UsageError(f"--grad-clip must be positive, got {self.grad_clip}")
        if self.shuffle_buffer < 0:
            raise UsageError(f"--shuffle-buffer must be at least 0, got {self.shuffle_buffer}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or not 0 <= self.momentum < 1:
            raise UsageError("--weight-decay and --warmup-steps must be ≥ 0 and --momentum in [0, 1)")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS),
                              ("on_nonfinite", ("abort", "skip")), ("on_invalid_rows", ("error", "drop"))):
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{_flag(name)} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.early_stopping is not None and self.valid is None:
            raise UsageError("--early-stopping needs --valid data to evaluate on")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise UsageError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")

    def identity(self, world: int = 1, shards: int = 1) -> dict:
        """What a resumed run must share with the saved one. The batch counts as the global batch
        and the data shards, so a run may resume with another number of processes (docs/distributed.md)."""
        return {**{k: getattr(self, k) for k in RESUME_KEYS}, "global_batch": self.batch_size * world, "data_shards": shards}


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ---------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, log: Log, plugin_paths: list[str] | None = None) -> dict:
    cfg.check()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    with process_group(cfg.device) as (dist, device_name):
        return _start(cfg, out, log, plugin_paths, dist, torch.device(device_name))


def _start(cfg: TrainConfig, out: Path, log: Log, plugin_paths, dist: Dist, device: torch.device) -> dict:
    # Every input is read and checked before anything is written: the checkpoint, the method's
    # options, every file's schema, the first training batch and, for a new run, all of --valid
    # (evaluated as the starting point). Later training rows are checked as they stream by.
    source = ckpt_io.load(cfg.checkpoint)
    model, _ = build(source.model, source.schema, source.model_config, plugin_paths)
    ckpt_io.load_into(model, source.state, cfg.checkpoint)
    model.to(device)
    schema = source.schema
    split = split_parameters(model, schema.task_names, source.model)
    method = get_method(cfg.method, plugin_paths, **cfg.method_options).to(device)
    state = _previous_state(cfg, out, dist.world)
    shards = data_shards(cfg, state, dist.world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = ParquetStream(cfg.data, schema, on_invalid=cfg.on_invalid_rows, shuffle_buffer=cfg.shuffle_buffer)
        valid = ParquetStream(cfg.valid, schema, on_invalid=cfg.on_invalid_rows) if cfg.valid and dist.main else None
        position = (state["epoch"], state["batch"]) if state else (1, 0)
        batches = _Batches(stream, cfg, shards, dist, position, device)
        before = evaluate(model, valid, schema, device=device) if valid is not None and not state else None
    for w in caught:
        log.warn(str(w.message))
    dist.barrier()  # every process has read the previous state before rank 0 writes
    if not dist.main:
        with stop_signals() as stop:
            return _train(cfg, out, log, state, source, model, split, method, batches, None, None, stop, dist, device)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out), stop_signals() as stop:
        if cfg.overwrite:
            for name in (*OUTPUTS, "config.toml"):
                (out / name).unlink(missing_ok=True)
        return _train(cfg, out, log, state, source, model, split, method, batches, valid, before, stop, dist, device)


def data_shards(cfg: TrainConfig, state: dict | None, world: int) -> int:
    """How many shards the data is cut into: --data-shards, else the resumed run's, else one per
    process. Each process reads shards/world of them, so the world size must divide it."""
    shards = cfg.data_shards or (state["config"].get("data_shards", 1) if state else world)
    if shards % world:
        where = f"the run in {cfg.out} reads its data in {shards} shard(s)" if state and not cfg.data_shards else f"--data-shards {shards}"
        raise UsageError(f"{where}: run it with a number of processes that divides {shards} (now {world})")
    if (cfg.batch_size * world) % shards:
        raise UsageError(f"--batch-size {cfg.batch_size} × {world} process(es) is not a multiple of the {shards} data shards")
    return shards


class _Batches:
    """This process's training batches: its data shards, and the first batch (at the run's starting
    position) read up front to check the data before anything is written."""

    def __init__(self, stream: ParquetStream, cfg: TrainConfig, shards: int, dist: Dist, position: tuple[int, int], device) -> None:
        self.stream, self.cfg, self.shards, self.device = stream, cfg, shards, device
        self.take = dist.shards(shards)
        self.shard_batch = cfg.batch_size * dist.world // shards
        self.num_rows = stream.num_rows
        self.steps_per_epoch = math.ceil(math.ceil(self.num_rows / shards) / self.shard_batch)
        self.position = position
        self.rest = self._read(*position)
        self.first = next(self.rest, None)

    def _read(self, epoch: int, start_batch: int):
        return self.stream.batches(self.shard_batch, shuffle=True, seed=self.cfg.seed, epoch=epoch, start_batch=start_batch,
                                   device=self.device, shards=self.shards, take=self.take)

    def batches(self, epoch: int, start_batch: int):
        if (epoch, start_batch) == self.position and self.first is not None:
            first, self.first = self.first, None
            yield first
            yield from self.rest
        else:
            yield from self._read(epoch, start_batch)


def _train(cfg: TrainConfig, out: Path, log: Log, state: dict | None, source: ckpt_io.Checkpoint, model, split,
           method, batches: _Batches, valid: ParquetStream | None, before: dict | None, stop: "_StopFlag",
           dist: Dist, device: torch.device) -> dict:
    """The loop. Distributed, every process runs it in step; rank 0 alone evaluates and writes."""
    schema = source.schema
    tasks = schema.task_names
    start = ckpt_io.load(out / "last.safetensors") if state else source
    if state:
        ckpt_io.load_into(model, start.state, str(out / "last.safetensors"))

    torch.manual_seed(cfg.seed)
    method.setup(len(tasks))
    method.segments = [p.numel() for p in split.shared]
    params, names = trainable(model, split, method)
    optimizer = make_optimizer(cfg, params)
    scaler = LossScaler() if cfg.precision == "fp16" else None
    if state:
        restore(start.extra, optimizer, names, method, scaler, device, split)
        log.info(f"resuming {out} at step {state['step']} (epoch {state['epoch']}, batch {state['batch']})")
    if dist.world > 1:
        # Dropout draws differ between processes; the methods' own generators are buffers, the
        # same everywhere. (Distributed resume therefore re-seeds: it is exact only without dropout.)
        torch.manual_seed(cfg.seed * 1_000_003 + dist.rank * 7_919 + (state["step"] if state else 0))

    steps_per_epoch = batches.steps_per_epoch  # fewer if invalid rows are dropped
    total = min(cfg.max_steps or steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.epochs)
    log.info(f"training {source.model} on {batches.num_rows} rows ({', '.join(tasks)}) with {cfg.method}; "
             f"{split.num_shared} shared parameters; {total} steps; device {device}")
    if dist.world > 1 or batches.shards > 1:
        log.info(f"{dist.world} process(es) × batch {cfg.batch_size} = global batch {cfg.batch_size * dist.world} "
                 f"({batches.shards} data shard(s) of {batches.shard_batch} rows per step); learning rate {cfg.lr:g} "
                 "as given (the gradients are means over the global batch; it is not scaled with the number of processes)")
    has_valid = cfg.valid is not None
    reduce = StepReducer(dist) if dist.world > 1 else None
    measure_rows = None
    if cfg.measure_every and dist.main:
        from cogradctl.transference import pick_batches

        size = min(MEASURE_BATCH_SIZE, cfg.batch_size)
        measure_rows = batches.stream.rows(pick_batches(batches.num_rows, MEASURE_BATCHES, size, cfg.seed))

    history_entry = {
        "run": "train", "method": cfg.method, "method_options": cfg.method_options, "data": cfg.data, "seed": cfg.seed,
        "lr": cfg.lr, "batch_size": cfg.batch_size, "from": str(cfg.checkpoint), "config": _plain(cfg),
        "optimizer": {"name": cfg.optimizer, "lr": cfg.lr, **{k: v for k, v in optimizer.defaults.items() if k in ("betas", "eps", "momentum")}},
    }
    history_entry["optimizer"] = json.loads(json.dumps(history_entry["optimizer"]))  # tuples → lists
    started = time.time() - (state["seconds"] if state else 0.0)
    pos = dict(state) if state else {"step": 0, "epoch": 1, "batch": 0, "best_score": None, "best_step": 0,
                                      "bad_evals": 0, "skipped": 0, "stopped_early": False, "finished_steps": False, "evaluated_step": None,
                                      "before": None, "last_eval": None}

    def snapshot(finished: bool) -> ckpt_io.Checkpoint:
        entry = {**history_entry, "steps": pos["step"], "epochs": pos["epoch"], "seconds": round(time.time() - started, 3), "time": now()}
        training_state = {**pos, "finished": finished, "seconds": time.time() - started, "config": cfg.identity(dist.world, batches.shards)}
        extra = {**optimizer_tensors(optimizer, names, split), **{f"method.{k}": v for k, v in method.state_dict().items()},
                 "rng.torch": torch.get_rng_state()}
        if device.type == "cuda":
            extra["rng.cuda"] = torch.cuda.get_rng_state(device)
        if scaler is not None:
            extra["scaler.scale"] = torch.tensor([scaler.scale, float(scaler.good_steps)], dtype=torch.float64)
        return ckpt_io.Checkpoint(source.model, source.model_config, schema, model.state_dict(), [*source.history, entry], extra, training_state)

    def save_last(finished: bool = False) -> None:
        if dist.main:
            ckpt_io.save(snapshot(finished), out / "last.safetensors")

    metrics = MetricsLog(out / "metrics.jsonl", keep_until=pos["step"] if state else None) if dist.main else _NoLog()
    tensorboard = TensorBoard(out / "tensorboard") if cfg.tensorboard and dist.main else None
    if dist.main:
        _write_config(out / "config.toml", cfg)

    def run_evaluation() -> dict:
        return record_evaluation(evaluate(model, valid, schema, device=device))

    def record_evaluation(result: dict) -> dict:
        score = validation_score(result)
        metrics.write({"step": pos["step"], "epoch": pos["epoch"], "valid": result["tasks"], "score": score})
        if tensorboard:
            tensorboard.scalars(pos["step"], {f"valid/{t}/{k}": v for t, m in result["tasks"].items() for k, v in m.items()})
        log.info(f"step {pos['step']} (epoch {pos['epoch']}): valid " + _summary(result))
        if score is not None and (pos["best_score"] is None or score > pos["best_score"]):
            pos.update(best_score=score, best_step=pos["step"], bad_evals=0)
            ckpt_io.save(snapshot(False), out / "best.safetensors")
        else:
            pos["bad_evals"] += 1
        pos["last_eval"] = result
        return result

    def evaluate_now() -> None:
        if pos.get("evaluated_step") == pos["step"]:
            return
        pos["evaluated_step"] = pos["step"]
        if dist.main:
            run_evaluation()
            model.train()
        if dist.from_main(bool(cfg.early_stopping) and pos["bad_evals"] >= (cfg.early_stopping or 0)):
            pos["stopped_early"] = True
            log.info(f"early stopping at step {pos['step']}: no better validation score in {cfg.early_stopping} evaluations")

    if not state:
        if before is not None:
            pos["before"] = record_evaluation(before)
            pos["bad_evals"] = 0
        elif not has_valid:
            log.info("no --valid data: skipping evaluation and best.safetensors")
        pos["evaluated_step"] = 0 if has_valid else None
        save_last()

    def stopping_now() -> bool:
        """SIGTERM/SIGINT received; distributed, by any process before the last step (all agree)."""
        return reduce.stop if reduce is not None else bool(stop.signum)

    def raise_if_stopped() -> None:
        if stopping_now():
            stop.signum = stop.signum or signal.SIGTERM  # another process was asked to stop
            dist.barrier()  # rank 0 has saved: no process exits before
            _raise_if_stopped(stop, pos, out)

    grads = TaskGradients(model, split, schema, device)
    autocast = Autocast(device, cfg.precision)
    model.train()
    with warnings.catch_warnings(record=True) as method_warnings:
        warnings.simplefilter("always")
        with log.progress(f"train {cfg.method}", total) as advance:
            advance(pos["step"])
            while pos["epoch"] <= cfg.epochs and not pos["finished_steps"]:
                stream = batches.batches(pos["epoch"], pos["batch"])
                while True:
                    inputs, labels = next(stream, (None, None))
                    if inputs is None and reduce is None:
                        break  # the epoch's data ran out
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(cfg, pos["step"], total)
                    try:
                        result = train_step(grads, method, optimizer, inputs, labels, autocast, scaler, cfg.grad_clip,
                                            reduce=reduce, stop=bool(stop.signum))
                    except Diverged as exc:
                        if cfg.on_nonfinite == "abort":
                            dist.barrier()
                            raise Diverged(f"{exc} at step {pos['step'] + 1}; the last saved state is kept in "
                                           f"{out / 'last.safetensors'}; lower --lr or use --on-nonfinite skip") from None
                        pos["skipped"] += 1
                        metrics.write({"step": pos["step"] + 1, "epoch": pos["epoch"], "skipped": str(exc), "skipped_total": pos["skipped"]})
                        result = (None, None)
                    if result is None:  # distributed: every process's data ran out
                        if pos["batch"] == 0:  # as the stream says for one process holding every shard
                            raise DataError(f"{cfg.data}: no rows left in epoch {pos['epoch']} on any of the {dist.world} "
                                            "processes after dropping invalid rows")
                        break
                    losses, g = result
                    pos["step"] += 1
                    pos["batch"] += 1
                    if losses is not None and (pos["step"] % cfg.log_every == 0 or pos["step"] == 1 or pos["step"] == total):
                        record = step_record(pos["step"], pos["epoch"], tasks, losses, g)
                        record["lr"] = optimizer.param_groups[0]["lr"]
                        if method.stats:
                            record["method"] = method.stats
                        if pos["skipped"]:
                            record["skipped_total"] = pos["skipped"]
                        metrics.write(record)
                        if tensorboard:
                            tensorboard.scalars(pos["step"], {f"loss/{t}": v for t, v in record["loss"].items()})
                    if measure_rows is not None and pos["step"] % cfg.measure_every == 0:
                        metrics.write({"step": pos["step"], "epoch": pos["epoch"], "transference": measure_during_training(model, split, schema, measure_rows, cfg, device)})
                        model.train()
                    advance(loss=f"{float(losses.sum()):.4f}" if losses is not None else "skipped")
                    for w in method_warnings:
                        log.warn(str(w.message))
                    method_warnings.clear()

                    pos["finished_steps"] = cfg.max_steps is not None and pos["step"] >= cfg.max_steps
                    if has_valid and (pos["finished_steps"] or (cfg.eval_every and pos["step"] % cfg.eval_every == 0)):
                        evaluate_now()
                    stopping = pos["finished_steps"] or pos["stopped_early"]
                    if stopping or stopping_now() or (cfg.save_every and pos["step"] % cfg.save_every == 0):
                        save_last(finished=stopping)
                    raise_if_stopped()
                    if stopping:
                        break
                if not (pos["finished_steps"] or pos["stopped_early"]):
                    # The epoch's data ran out: evaluate, then move on (and save) at the epoch boundary.
                    if has_valid:
                        evaluate_now()
                    pos["epoch"] += 1
                    pos["batch"] = 0
                    save_last(finished=pos["epoch"] > cfg.epochs or pos["stopped_early"])
                    raise_if_stopped()
                if pos["stopped_early"]:
                    break
    dist.barrier()  # the last save is done before any process leaves
    metrics.close()
    if tensorboard:
        tensorboard.close()
    best = {"score": pos["best_score"], "auc": pos["best_score"] if _binary(schema) else None, "step": pos["best_step"]}
    return {
        "method": cfg.method,
        "steps": pos["step"],
        "epochs": pos["epoch"] - (1 if pos["batch"] == 0 else 0),
        "seconds": round(time.time() - started, 3),
        "out": str(out),
        "skipped": pos["skipped"],
        "stopped_early": pos["stopped_early"],
        "before": pos["before"],
        "after": pos["last_eval"] if has_valid else None,
        "best": best if has_valid else None,
    }


def _raise_if_stopped(stop: "_StopFlag", pos: dict, out: Path) -> None:
    if stop.signum:
        name = signal.Signals(stop.signum).name
        raise Stopped(f"stopped by {name} at step {pos['step']}; state saved in {out / 'last.safetensors'}; "
                      "rerun the same command to resume", stop.signum)


def _previous_state(cfg: TrainConfig, out: Path, world: int = 1) -> dict | None:
    """The saved position of an unfinished run in ``out`` to resume from, or None to start afresh
    (reads only)."""
    last = out / "last.safetensors"
    existing = [n for n in OUTPUTS if (out / n).exists()]
    state = ckpt_io.load(last).training_state if last.exists() else None
    if cfg.overwrite:
        if cfg.resume:
            raise UsageError("--resume and --overwrite contradict each other")
        return None  # its outputs are removed once the inputs have been checked
    if state is None:
        if cfg.resume:
            raise UsageError(f"--resume: {out} holds no run to resume")
        if existing:
            raise UsageError(f"--out {out}: already holds files ({', '.join(existing)}); choose another directory or pass --overwrite")
        return None
    if state.get("finished"):
        if cfg.resume:
            raise UsageError(f"--resume: the run in {out} has finished (step {state['step']}); pass --overwrite to start again")
        raise UsageError(f"--out {out}: already holds a finished run; choose another directory or pass --overwrite")
    saved = state.get("config", {})
    now = cfg.identity(world, data_shards(cfg, state, world))
    changed = [k for k, v in now.items() if json.dumps(saved.get(k)) != json.dumps(v)]
    if changed:
        listed = ", ".join(f"{k} ({saved.get(k)!r} → {now[k]!r})" for k in changed)
        hint = ""
        if "global_batch" in changed and saved.get("global_batch", 0) % world == 0:
            hint = f" (--batch-size is per process: with {world} process(es), pass --batch-size {saved['global_batch'] // world})"
        raise UsageError(f"--out {out} holds an unfinished run with other settings: {listed}{hint}; rerun it as it was, or pass --overwrite")
    return state


# ---------------------------------------------------------------------------- one step


def train_step(grads: TaskGradients, method, optimizer: torch.optim.Optimizer, inputs, labels,
               autocast: "Autocast | None" = None, scaler: "LossScaler | None" = None,
               grad_clip: float | None = None, reduce: StepReducer | None = None,
               stop: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One optimisation step: per-task gradients, the method's update on the shared parameters,
    each task's weighted gradient on its own parameters, an optimizer step. → (losses, K×P grads).

    With fp16, each task's loss is multiplied by the loss scale before its backward pass and every
    per-task gradient is divided by it before the method sees them; an overflow skips the step
    and halves the scale. A non-finite loss or gradient otherwise raises Diverged (naming the tasks).

    Distributed (``reduce``): the losses and gradients are those of the global batch, the same on
    every process; ``inputs`` is None on a process out of data, and the step returns None (nothing
    done) when every process is. ``stop`` is this process's stop request, shared with the others.
    """
    split, tasks = grads.split, grads.tasks
    requires_hvp = getattr(method, "requires_hvp", False)
    scale = scaler.scale if scaler is not None else None
    if inputs is not None:
        with autocast or _nothing():
            losses, g, own = grads(inputs, labels, create_graph=requires_hvp, loss_scale=scale)
    else:
        losses, g, own = grads.nothing()
    hvp = grads.hvp() if requires_hvp and inputs is not None else None
    if reduce is not None:
        n = 0 if inputs is None else len(labels)
        reduced = reduce(n, losses, g, own, stop)
        if reduced is None:
            return None
        losses, own = reduced
        if requires_hvp:
            hvp = reduce.hvp(n, hvp)
    # A NaN or inf anywhere makes the total non-finite: one reduction and one sync per step. Only
    # then (or if the sum of finite values overflowed) is the per-task mask built.
    if not math.isfinite(float(g.sum() + losses.sum())):
        finite = torch.isfinite(losses) & torch.isfinite(g).all(dim=1)
        if scaler is not None and not bool(finite.all()):
            scaler.update(found_inf=True)
            return losses, g
        if not bool(finite.all()):
            bad = [t for t, ok in zip(tasks, finite.tolist()) if not ok]
            raise Diverged(f"non-finite loss or gradient for task(s) {', '.join(bad)}")
    # Before the method: uw and gradnorm set their weights' .grad. The loop that
    # zero_grad(set_to_none=True) runs, without its wrapper's fixed per-call cost.
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
    update = method(g, losses, hvp=hvp) if requires_hvp else method(g, losses)
    set_shared_grad(split, update)
    weights = method.task_weights()
    for k, task in enumerate(tasks):
        w = 1.0 if weights is None else float(weights[k])
        for param, grad in zip(split.tasks[task], own[task]):
            param.grad = grad * w if w != 1.0 else grad
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    optimizer_step(optimizer)
    if scaler is not None:
        scaler.update(found_inf=False)
    return losses, g


class LossScaler:
    """Dynamic loss scaling for fp16, with torch.amp.GradScaler's policy (start 2^16, halve on
    overflow, double after 2000 good steps). It is applied per task because the gradient methods
    need every unscaled task gradient, not the sum that GradScaler unscales."""

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale, self.growth_interval, self.good_steps = scale, growth_interval, 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale, self.good_steps = max(self.scale / 2.0, 1.0), 0
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale, self.good_steps = self.scale * 2.0, 0


class Autocast:
    """``torch.autocast`` for bf16 (CPU or CUDA) and fp16 (CUDA); a no-op for fp32."""

    def __init__(self, device: torch.device, precision: str) -> None:
        self.ctx = None if precision == "fp32" else torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


@contextmanager
def _nothing():
    yield


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam and AdamW use PyTorch's fused kernel (CPU and CUDA): measured 0.1 ms against 0.47 ms
    for the default loop on the sample MMoE, a step cost that counts against the floor."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    try:
        return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel does not take
        return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``; for the fused Adam/AdamW of ``make_optimizer``, the same fused kernel
    through torch's functional ``torch.optim.adam.adam``, without ``Optimizer.step``'s per-call
    bookkeeping (step hooks, profiler region, per-parameter state checks), which was 0.25 of the
    0.4 ms an Adam step took inside a small model's training step (ad hoc in-flow timing, mmoe K=2:
    the floor is 14 ms). Anything else, a first step (state not yet created) included, goes
    through ``optimizer.step()``; tests check both paths give identical weights and state.
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        optimizer.step()
        return
    calls = []
    for group in optimizer.param_groups:
        if (not group.get("fused") or group["amsgrad"] or group["capturable"] or group["differentiable"]
                or "decoupled_weight_decay" not in group):
            optimizer.step()
            return
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = optimizer.state.get(param)
            if not state or param.grad.is_sparse or torch.is_complex(param):
                optimizer.step()
                return
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            calls.append((group, params, grads, exp_avgs, exp_avg_sqs, steps))
    with torch.no_grad():
        for group, params, grads, exp_avgs, exp_avg_sqs, steps in calls:
            beta1, beta2 = group["betas"]
            functional_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True,
                            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=False,
                            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                            eps=group["eps"], maximize=group["maximize"])


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate of the step after ``step`` steps: linear warmup, then constant, cosine or linear decay to 0."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(total - cfg.warmup_steps, 1)
    t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (0.5 * (1.0 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1.0 - t)


# ---------------------------------------------------------------------------- state and data


def trainable(model: torch.nn.Module, split: ParamSplit, method) -> tuple[list[torch.nn.Parameter], list[str | None]]:
    """The optimizer's parameters and their checkpoint names: the shared parameters as one flat
    parameter (``flatten_shared``; name None: its state is saved under the shared parameters'
    own names), then every other model parameter, then the method's (``method.<name>``)."""
    flat = flatten_shared(split)
    shared = {id(p) for p in split.shared} if flat is not None else set()
    params: list[torch.nn.Parameter] = [flat] if flat is not None else []
    names: list[str | None] = [None] if flat is not None else []
    for name, param in model.named_parameters():
        if id(param) not in shared:
            params.append(param)
            names.append(name)
    params += list(method.parameters())
    names += [f"method.{n}" for n, _ in method.named_parameters()]
    return params, names


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str | None], split: ParamSplit | None = None) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as ``optim.<key>.<parameter name>`` tensors; the flat
    shared parameter's (name None) cut into one entry per shared parameter, so a checkpoint reads
    the same with or without ``flatten_shared``."""
    out = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params):
        for key, value in optimizer.state.get(param, {}).items():
            value = torch.as_tensor(value).detach()
            if name is None:  # a P-vector cut by parameter; a scalar (Adam's step count) repeated
                pieces = unflatten_shared(split, value) if value.numel() == split.flat.numel() else dict.fromkeys(split.shared_names, value)
                for shared_name, piece in pieces.items():
                    out[f"optim.{key}.{shared_name}"] = piece.clone()
            else:
                out[f"optim.{key}.{name}"] = value.clone()
    return out


def _saved_state(extra: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix, suffix = "optim.", f".{name}"
    return {k[len(prefix) : -len(suffix)]: v for k, v in extra.items() if k.startswith(prefix) and k.endswith(suffix)
            and k[len(prefix) : -len(suffix)] and "." not in k[len(prefix) : -len(suffix)]}


def restore(extra: dict[str, torch.Tensor], optimizer, names: list[str | None], method, scaler, device,
            split: ParamSplit | None = None) -> None:
    """Put back the optimizer, method, RNG and loss-scale state saved by a previous run."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params):
        if name is None:  # the flat shared parameter: its state, joined from the shared parameters' entries
            parts = [_saved_state(extra, n) for n in split.shared_names]
            keys = set(parts[0]) if all(parts) and all(set(p) == set(parts[0]) for p in parts) else set()
            entries = {k: parts[0][k] if parts[0][k].numel() == 1 else torch.cat([p[k].reshape(-1) for p in parts]) for k in keys}
        else:
            entries = _saved_state(extra, name)
        if entries:
            optimizer.state[param] = {k: (v.to(device) if k != "step" else v) for k, v in entries.items()}
    method_state = {k[len("method.") :]: v for k, v in extra.items() if k.startswith("method.")}
    if method_state:
        method.load_state_dict(method_state)
    if "rng.torch" in extra:
        torch.set_rng_state(extra["rng.torch"])
    if "rng.cuda" in extra and device.type == "cuda":
        torch.cuda.set_rng_state(extra["rng.cuda"], device)
    if scaler is not None and "scaler.scale" in extra:
        scaler.scale, scaler.good_steps = float(extra["scaler.scale"][0]), int(extra["scaler.scale"][1])


class MetricsLog:
    """Appends JSON lines, flushed each time. On resume, records after the saved step (written by
    the run that died after its last save) are dropped first, so the file reads as one run."""

    def __init__(self, path: Path, keep_until: int | None) -> None:
        if keep_until is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and _step_of(line) <= keep_until]
            ckpt_io.atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line from a killed run: drop it


class _NoLog:
    """metrics.jsonl on processes other than rank 0: nothing is written."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard:
    def __init__(self, logdir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError('--tensorboard needs the tensorboard package: pip install "cogradctl[tensorboard]"') from None
        self.writer = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


@contextmanager
def run_lock(out: Path):
    """Refuse an output directory that another live run holds; recover the lock of a dead one."""
    lock = out / ".lock"
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = _lock_owner(lock)
            if pid is not None and (host != socket.gethostname() or _alive(pid)):
                where = "" if host == socket.gethostname() else f" on {host}"
                raise UsageError(f"--out {out}: in use by another cogradctl run (pid {pid}{where}); "
                                 f"wait for it, or remove {lock} if that process is gone") from None
            lock.unlink(missing_ok=True)  # stale: its process is dead
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        try:
            if lock.read_text() == me:
                lock.unlink()
        except OSError:
            pass


def _lock_owner(lock: Path) -> tuple[int | None, str]:
    try:
        pid, _, host = lock.read_text().partition(" ")
        return int(pid), host.strip()
    except (OSError, ValueError):
        return None, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _StopFlag:
    signum: int | None = None


@contextmanager
def stop_signals():
    """On SIGTERM or SIGINT, set a flag: the loop finishes its step, saves, and exits 128+signal."""
    flag = _StopFlag()
    previous = {}

    def handler(signum, frame):
        flag.signum = signum

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _write_config(path: Path, cfg: TrainConfig) -> None:
    """The effective configuration as a flat TOML file that ``--config`` accepts back."""
    lines = ["# the effective configuration of this run (cogradctl train --config accepts this file)"]
    for key, value in _plain(cfg).items():
        if value is None or key in ("overwrite", "resume"):
            continue
        if isinstance(value, dict):
            lines.append(f"{key} = {{ {', '.join(f'{json.dumps(k)} = {json.dumps(v)}' for k, v in value.items())} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    ckpt_io.atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _plain(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


def validation_score(result: dict) -> float | None:
    """Higher is better: the mean AUC of the binary tasks, or minus the mean MSE if there are none."""
    auc = mean_auc(result)
    if auc is not None:
        return auc
    mses = [m["mse"] for m in result["tasks"].values() if "mse" in m]
    return -sum(mses) / len(mses) if mses else None


def _binary(schema) -> bool:
    return any(t.type == "binary" for t in schema.tasks)


# ---------------------------------------------------------------------------- logging helpers

MEASURE_BATCHES, MEASURE_BATCH_SIZE = 4, 256  # --measure-every: cheap, and the same batches every time


def measure_during_training(model, split, schema, rows: data_io.Dataset, cfg: TrainConfig, device) -> dict:
    """Transference on the MEASURE_BATCHES fixed training batches in ``rows`` (picked once, seeded by
    --seed), without the per-batch provenance (it is the same at every step)."""
    from cogradctl.transference import measure

    result = measure(model, split, schema, rows, MEASURE_BATCHES, min(MEASURE_BATCH_SIZE, cfg.batch_size), seed=cfg.seed, device=device)
    result.pop("measured")
    return result


def step_record(step: int, epoch: int, tasks: list[str], losses: torch.Tensor, g: torch.Tensor) -> dict:
    """Per-task loss and shared-gradient norm, and the pairwise cosine of the task gradients."""
    gram = (g @ g.T).double()
    norms = gram.diagonal().clamp_min(0).sqrt()
    cosine = {}
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            d = float(norms[i] * norms[j])
            cosine[f"{tasks[i]}|{tasks[j]}"] = float(gram[i, j]) / d if d > 0 else 0.0
    return {
        "step": step,
        "epoch": epoch,
        "loss": {t: float(v) for t, v in zip(tasks, losses)},
        "grad_norm": {t: float(v) for t, v in zip(tasks, norms)},
        "cosine": cosine,
    }


def _summary(result: dict) -> str:
    parts = []
    for task, m in result["tasks"].items():
        if "auc" in m:
            parts.append(f"{task} auc={m['auc']:.4f}" if m["auc"] is not None else f"{task} auc=n/a")
        else:
            parts.append(f"{task} mse={m['mse']:.4f}")
    return ", ".join(parts)


def now() -> str:
    """The current UTC time as an ISO 8601 string (checkpoint history entries)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
