"""Setting a run up: every input read and checked, then the optimizer, the method and the logs
made ready (from the saved state when the run resumes)."""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path

import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import data as data_io
from cogradctl import tables
from cogradctl.console import Log, counted
from cogradctl.contract import check_output
from cogradctl.distributed import Dist, StepReducer
from cogradctl.errors import CheckpointError
from cogradctl.evaluate import evaluate
from cogradctl.methods import get_method
from cogradctl.models import build, split_parameters
from cogradctl.stream import ParquetStream
from cogradctl.taskgrad import TaskGradients
from cogradctl.train.batches import Batches, data_shards
from cogradctl.train.config import TrainConfig, plain, write_config
from cogradctl.train.guard import StopFlag
from cogradctl.train.logs import MetricsLog, NoLog, TensorBoard
from cogradctl.train.optim import make_optimizer, trainable
from cogradctl.train.report import OovCount, ProgressLine, count_rows, warn_dropped
from cogradctl.train.run import Inputs, Progress, Run
from cogradctl.train.save import finite, save_last
from cogradctl.train.state import check_resume_tensors, previous_state, restore
from cogradctl.train.step import Autocast, LossScaler

MEASURE_BATCHES, MEASURE_BATCH_SIZE = 4, 256  # --measure-every: cheap, and the same batches every time


def read_inputs(cfg: TrainConfig, out: Path, log: Log, plugin_paths, dist: Dist, device: torch.device) -> Inputs:
    """The checkpoint, the method's options, every file's schema, the first training batch and, for
    a new run, all of --valid (evaluated as the starting point). Later training rows are checked as
    they stream by."""
    source = ckpt_io.load(cfg.checkpoint)
    model, _ = build(source.model, source.schema, source.model_config, plugin_paths)
    ckpt_io.load_into(model, source.state, cfg.checkpoint)
    for name, tensor in source.state.items():
        if tensor.is_floating_point() and not bool(finite(tensor)):
            raise CheckpointError(
                f"{cfg.checkpoint}: weight {name} holds NaN or infinite values (a diverged run's?); "
                "train from a checkpoint with finite weights"
            )
    source.state.clear()  # the model holds the weights now: not a second copy of them (its tables) all run
    model.to(device)
    check_output(model, source.schema, source.model)  # exit 2 before --out is written
    split = split_parameters(model, source.schema.task_names, source.model)
    method = get_method(cfg.method, plugin_paths, **cfg.method_options).to(device)
    cfg.embeddings = tables.resolve(cfg.embeddings, model, split)  # "auto" decided once, saved so
    tables.check_mode(cfg.embeddings, method)
    if cfg.embeddings != "dense" and tables.embedding_tables(model, split):  # dense: as every run before
        log.info(tables.describe(cfg.embeddings, model, split))
    tables.separate(model, split, cfg.embeddings)
    state = previous_state(cfg, out, dist.world)
    if state is None and not cfg.overwrite and (out / "last.safetensors").exists():
        log.info(f"{out}: its run stopped before its first step; starting it again")
    shards = data_shards(cfg, state, dist.world)
    labels = source.schema.task_names
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = cfg.label_options
        stream = ParquetStream(
            cfg.data,
            source.schema,
            on_invalid=cfg.on_invalid_rows,
            shuffle_buffer=cfg.shuffle_buffer,
            label_options=options,
        )
        data = {"train": count_rows(stream, cfg.on_invalid_rows)}  # rows to drop: read once, counted
        valid = None
        if cfg.valid and dist.main:
            valid = ParquetStream(cfg.valid, source.schema, on_invalid=cfg.on_invalid_rows, label_options=options)
            data["valid"] = count_rows(valid, cfg.on_invalid_rows)
        if dist.main:
            why = _drop_options(cfg)
            warn_dropped(log, data["train"], labels, "--data", "training on", why)
            if valid is not None:
                warn_dropped(log, data["valid"], labels, "--valid", "evaluating on", why)
        position = (state["epoch"], state["batch"]) if state else (1, 0)
        batches = Batches(stream, cfg, shards, dist, position, device, rows_used=data["train"]["rows_used"])
        if batches.first is not None:  # a plugin's table read other than by its lookups: exit 2 now
            tables.probe(model, split, cfg.embeddings, batches.first[0])
        before = (
            evaluate(model, valid, source.schema, device=device, standard_errors=True)
            if valid is not None and not state
            else None
        )
    for w in caught:
        log.warn(str(w.message))
    return Inputs(source, model, split, method, state, batches, valid, before, data)


def _drop_options(cfg: TrainConfig) -> str:
    """The options that drop rows, as the warning names them."""
    parts = ["--on-invalid-rows drop"] if cfg.on_invalid_rows == "drop" else []
    return ", ".join([*parts, *(["--missing-labels drop"] if cfg.missing_labels == "drop" else [])])


def prepare(
    cfg: TrainConfig, out: Path, log: Log, dist: Dist, device: torch.device, inputs: Inputs, stop: StopFlag
) -> Run:
    """The optimizer and the method set up (from the saved state on resume), the logs opened,
    config.toml written: a :class:`Run` ready for its first step."""
    state, split, method, batches = inputs.state, inputs.split, inputs.method, inputs.batches
    if state:  # the weights first, then the rest: never the whole checkpoint beside the model
        last = out / "last.safetensors"
        ckpt_io.load_into(inputs.model, ckpt_io.load_part(last, weights=True), str(last))
        extra = ckpt_io.load_part(last, weights=False)
    torch.manual_seed(cfg.seed)
    method.setup(len(inputs.source.schema.task_names))
    method.segments = [p.numel() for p in split.shared]
    params, names = trainable(inputs.model, split, method)
    optimizer = make_optimizer(cfg, params, tables=len(split.tables))
    scaler = LossScaler() if cfg.precision == "fp16" else None
    if state:
        taken = state["step"] - state.get("skipped", 0)
        check_resume_tensors(extra, optimizer, names, method, scaler, device, split, last, taken)
        restore(extra, optimizer, names, method, scaler, device, split)
        log.info(f"resuming {out} at step {state['step']} (epoch {state['epoch']}, batch {state['batch']})")
    if dist.world > 1:
        # Dropout draws differ between processes; the methods' own generators are buffers, the
        # same everywhere. (Distributed resume therefore re-seeds: it is exact only without dropout.)
        torch.manual_seed(cfg.seed * 1_000_003 + dist.rank * 7_919 + (state["step"] if state else 0))
    total = _total_steps(cfg, batches, state)
    _log_start(cfg, log, inputs, dist, device, total)
    measure_rows = _measure_rows(cfg, batches) if cfg.measure_every and dist.main else None
    run = Run(
        cfg=cfg,
        out=out,
        log=log,
        dist=dist,
        device=device,
        inputs=inputs,
        optimizer=optimizer,
        names=names,
        scaler=scaler,
        grads=TaskGradients(inputs.model, split, inputs.source.schema, device, sum_tables=cfg.embeddings == "sum"),
        autocast=Autocast(device, cfg.precision),
        reduce=StepReducer(dist) if dist.world > 1 else None,
        stop=stop,
        metrics=NoLog(),
        tensorboard=None,
        measure_rows=measure_rows,
        total=total,
        history_entry=_history_entry(cfg, optimizer),
        started=time.time() - (state["seconds"] if state else 0.0),
        progress=Progress.saved(state) if state else Progress(),
        method_warnings=[],
        saved_step=state["step"] if state else None,
        session_started=time.time(),
        sessions=state.get("sessions", 1) + 1 if state else 1,
        resumed_at=state["step"] if state else None,
        oov=OovCount(inputs.batches.stream),
        line=ProgressLine(log, total, cfg.epochs, dist.world),
    )
    if not state:  # the first write: --out now holds this run (at step 0), restarted by the same command
        save_last(run, initial=True)
    if dist.main:
        run.metrics = MetricsLog(out / "metrics.jsonl", keep_until=state["step"] if state else None)
        run.metrics.write({"step": run.progress.step, "epoch": run.progress.epoch, "data": inputs.data})
        run.tensorboard = TensorBoard(out / "tensorboard") if cfg.tensorboard else None
        write_config(out / "config.toml", cfg)
    return run


def _total_steps(cfg: TrainConfig, batches: Batches, state: dict | None) -> int:
    """The run's length in steps, fixed when it starts (the learning-rate schedule decays to 0 at
    it): a resumed run keeps its saved one. Rows --on-invalid-rows drop leaves out do not count;
    states saved before ``total_steps`` was kept counted every row, as their run did."""
    if state and "total_steps" in state:
        return state["total_steps"]
    per_epoch = batches.steps(batches.num_rows) if state else batches.steps_per_epoch
    return min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)


def _log_start(cfg: TrainConfig, log: Log, inputs: Inputs, dist: Dist, device: torch.device, total: int) -> None:
    batches, rows = inputs.batches, inputs.data["train"]
    used = counted(rows["rows_used"], "row")
    if rows["rows_dropped"]:
        used += f" ({rows['rows_dropped']} of {rows['rows']} dropped as invalid)"
    log.info(
        f"training {inputs.source.model} on {used} ({', '.join(inputs.source.schema.task_names)}) "
        f"with {cfg.method}; {inputs.split.num_shared} shared parameters; {counted(total, 'step')}; device {device}"
    )
    if dist.world > 1 or batches.shards > 1:
        log.info(
            f"{counted(dist.world, 'process', 'processes')} × batch {cfg.batch_size} = global batch "
            f"{cfg.batch_size * dist.world} ({counted(batches.shards, 'data shard')} of "
            f"{counted(batches.shard_batch, 'row')} per step); learning rate {cfg.lr:g} "
            "as given (the gradients are means over the global batch; it is not scaled with the number of processes)"
        )


def _history_entry(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> dict:
    """This run's entry in the checkpoint's history (steps, epochs, seconds and time are added at each save)."""
    settings = {k: v for k, v in optimizer.defaults.items() if k in ("betas", "eps", "momentum")}
    return {
        "run": "train",
        "method": cfg.method,
        "method_options": cfg.method_options,
        "data": cfg.data,
        "seed": cfg.seed,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "from": str(cfg.checkpoint),
        "config": plain(cfg),
        "optimizer": json.loads(json.dumps({"name": cfg.optimizer, "lr": cfg.lr, **settings})),  # tuples → lists
    }


def _measure_rows(cfg: TrainConfig, batches: Batches) -> data_io.Dataset:
    """--measure-every's MEASURE_BATCHES fixed training batches, picked once (seeded by --seed)."""
    from cogradctl.transference import pick_batches

    size = min(MEASURE_BATCH_SIZE, cfg.batch_size)
    stats = copy.deepcopy(batches.stream.stats)
    rows = batches.stream.rows(pick_batches(batches.num_rows, MEASURE_BATCHES, size, cfg.seed))
    batches.stream.stats.clear()  # the stream's counts stay those of the epochs read (report.OovCount)
    batches.stream.stats.update(stats)
    return rows
