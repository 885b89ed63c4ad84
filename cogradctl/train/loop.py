"""The training loop: fine-tune a checkpoint with a gradient method, evaluate, save, resume.

Outputs in ``out``: ``last.safetensors`` (the latest weights, plus everything needed to resume:
optimizer and method state, RNG state, position in the data), ``best.safetensors`` (best
validation score), ``metrics.jsonl`` (one JSON object per logged step or evaluation),
``config.toml`` (the effective configuration) and, while running, ``.lock``.

The life of a run, top to bottom: ``train`` checks the paths, takes ``--out``'s lock (the one
file written before the inputs are checked: ``guard.run_dir``), then reads and checks every input,
the previous state in ``--out`` included, before anything else is written (``setup.read_inputs``),
builds the :class:`~cogradctl.train.run.Run` (``setup.prepare``, whose first write is the step-0
``last.safetensors`` that marks the directory as this run's), records the starting point, runs
``_loop`` and returns a summary. The loop's
state is the ``Progress`` dataclass, saved in every checkpoint as its ``training_state``;
everything else the loop touches is a field of ``Run``, so each named step (``_step``,
``_after_step``, ``save.evaluate_now``, ``_end_epoch``, ``save.save_last``) shows what it reads
and changes.

Resume is exact: the order of the data in epoch e depends only on (seed, e), the learning rate
only on the step, and the rest is in the saved state, so a run killed at any point and resumed
ends with the same weights as an uninterrupted one (bit-identical on CPU with the same seed).
"""

from __future__ import annotations

import signal
import time
import warnings
from pathlib import Path

import torch

from cogradctl.console import Log
from cogradctl.data import truncation_message
from cogradctl.distributed import Dist, process_group
from cogradctl.errors import DataError, Diverged, Stopped
from cogradctl.train.config import OUTPUTS, TrainConfig
from cogradctl.train.guard import StopFlag, run_dir, stop_signals
from cogradctl.train.logs import step_record
from cogradctl.train.optim import lr_at
from cogradctl.train.report import duration, masked_text, oov_text
from cogradctl.train.run import Inputs, Run
from cogradctl.train.save import evaluate_now, kept_state, record_evaluation, save_last, score_tasks
from cogradctl.train.setup import MEASURE_BATCH_SIZE, MEASURE_BATCHES, prepare, read_inputs
from cogradctl.train.state import check_out
from cogradctl.train.step import train_step

# ---------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, log: Log, plugin_paths: list[str] | None = None) -> dict:
    """Run ``cogradctl train``; distributed, every process runs it in step and rank 0 alone
    evaluates and writes. → the summary that ``train --json`` prints."""
    cfg.check()
    out = Path(cfg.out)
    check_out(cfg, out)
    with process_group(cfg.device) as (dist, device_name), run_dir(out, dist.main):
        device = torch.device(device_name)
        dist.barrier()  # rank 0 holds --out's lock before any process reads the previous state
        inputs = read_inputs(cfg, out, log, plugin_paths, dist, device)
        dist.barrier()  # every process has read the previous state before rank 0 writes
        with stop_signals() as stop:
            if dist.main and cfg.overwrite:
                for name in (*OUTPUTS, "config.toml"):
                    (out / name).unlink(missing_ok=True)
            return _train(cfg, out, log, dist, device, inputs, stop)


def _train(
    cfg: TrainConfig, out: Path, log: Log, dist: Dist, device: torch.device, inputs: Inputs, stop: StopFlag
) -> dict:
    run = prepare(cfg, out, log, dist, device, inputs, stop)
    p = run.progress
    if inputs.state is None:  # a new run: record the starting point
        if inputs.before is not None:
            p.before = record_evaluation(run, inputs.before)
            p.bad_evals = 0
        elif not run.has_valid:
            log.info("no --valid data: skipping evaluation and best.safetensors")
        p.evaluated_step = 0 if run.has_valid else None
        save_last(run)
    inputs.model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.method_warnings = caught
        _loop(run)
    _report_oov(run, epoch_end=False)  # if no epoch was read in full: over the rows read
    dist.barrier()  # the last save is done before any process leaves
    run.metrics.close()
    if run.tensorboard:
        run.tensorboard.close()
    return _result(run)


def _loop(run: Run) -> None:
    """Epochs of steps until the data, --max-steps or early stopping ends the run; a stop signal
    saves and raises Stopped."""
    cfg, p = run.cfg, run.progress
    with run.log.progress(f"train {cfg.method}", run.total) as advance:
        advance(p.step)
        while p.epoch <= cfg.epochs and not (p.finished_steps or p.stopped_early):
            run.oov.epoch_begins(p.batch)
            for inputs, labels in _epoch_batches(run):
                result = _step(run, inputs, labels)
                if result is None:  # distributed: every process's data ran out
                    break
                _after_step(run, *result, advance, rows=0 if labels is None else len(labels))
                p.finished_steps = cfg.max_steps is not None and p.step >= cfg.max_steps
                if run.has_valid and (p.finished_steps or _every(p.step, cfg.eval_every)):
                    evaluate_now(run)
                stopping = p.finished_steps or p.stopped_early
                if stopping or _stop_requested(run) or _every(p.step, cfg.save_every):
                    save_last(run, finished=stopping)
                _raise_if_stopped(run)
                if stopping:
                    break
            if not (p.finished_steps or p.stopped_early):
                _end_epoch(run)


def _epoch_batches(run: Run):
    """The epoch's batches from the current position. Distributed, a process whose data ran out
    yields (None, None) until every process's has: its steps then do nothing but take part."""
    stream = run.inputs.batches.batches(run.progress.epoch, run.progress.batch)
    while True:
        inputs, labels = next(stream, (None, None))
        if inputs is None and run.reduce is None:
            return
        yield inputs, labels


def _step(run: Run, inputs, labels) -> tuple | None:
    """One optimisation step at the scheduled learning rate → (losses, K×P gradients); (None, None)
    for a non-finite step skipped (--on-nonfinite skip); None when every process's data ran out."""
    cfg, p = run.cfg, run.progress
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(cfg, p.step, run.total)
    try:
        result = train_step(
            run.grads,
            run.inputs.method,
            run.optimizer,
            inputs,
            labels,
            run.autocast,
            run.scaler,
            cfg.grad_clip,
            reduce=run.reduce,
            stop=bool(run.stop.signum),
        )
    except Diverged as exc:
        if cfg.on_nonfinite == "abort":
            run.dist.barrier()
            raise Diverged(
                f"{exc} at step {p.step + 1}; {kept_state(run)}; lower --lr or use --on-nonfinite skip"
            ) from None
        p.skipped += 1
        run.metrics.write({"step": p.step + 1, "epoch": p.epoch, "skipped": str(exc), "skipped_total": p.skipped})
        return None, None
    if result is None and p.batch == 0:  # as the stream says for one process holding every shard
        raise DataError(
            f"{cfg.data}: no rows left in epoch {p.epoch} on any of the {run.dist.world} "
            "processes after dropping invalid rows"
        )
    return result


def _after_step(run: Run, losses: torch.Tensor | None, g: torch.Tensor | None, advance, rows: int = 0) -> None:
    """Count the step; log it (every --log-every steps, the first and the last), measure
    transference (--measure-every), move the progress bar (or write the periodic progress line)
    and pass on the method's warnings."""
    cfg, p = run.cfg, run.progress
    p.step += 1
    p.batch += 1
    d = run.reduce.denominators if run.reduce is not None else getattr(run.grads, "denominators", None)
    observed = None if d is None else (d > 0).tolist()  # a task without a labelled row: its loss is not logged
    if losses is not None and (p.step % cfg.log_every == 0 or p.step == 1 or p.step == run.total):
        record = step_record(p.step, p.epoch, run.inputs.source.schema.task_names, losses, g, observed)
        record["lr"] = run.optimizer.param_groups[0]["lr"]
        if run.inputs.method.stats:
            record["method"] = run.inputs.method.stats
        if p.skipped:
            record["skipped_total"] = p.skipped
        run.metrics.write(record)
        if run.tensorboard:
            run.tensorboard.scalars(p.step, {f"loss/{t}": v for t, v in record["loss"].items() if v is not None})
    if run.measure_rows is not None and p.step % cfg.measure_every == 0:
        run.metrics.write({"step": p.step, "epoch": p.epoch, "transference": _measure(run)})
        run.inputs.model.train()
    loss = float(losses.sum()) if losses is not None else None
    advance(loss=f"{loss:.4f}" if loss is not None else "skipped")
    run.line.step(p.step, p.epoch, rows, loss)
    for w in run.method_warnings:
        run.log.warn(str(w.message))
    run.method_warnings.clear()


def _end_epoch(run: Run) -> None:
    """The epoch's data ran out: evaluate, then move on (and save) at the epoch boundary."""
    p = run.progress
    run.line.epoch_end(p.step, p.epoch)
    if run.has_valid:
        evaluate_now(run)
    _report_oov(run, epoch_end=True)
    p.epoch += 1
    p.batch = 0
    save_last(run, finished=p.epoch > run.cfg.epochs or p.stopped_early)
    _raise_if_stopped(run)


def _report_oov(run: Run, epoch_end: bool) -> None:
    """The training data's categorical values unseen at init, once counted (report.OovCount): a
    warning if there are any, a ``data`` record in metrics.jsonl either way."""
    p = run.progress
    counts = run.oov.take(run.dist, p.epoch, epoch_end)
    if counts is None or not run.dist.main:
        return
    entry = run.inputs.data["train"]
    counts = dict(counts)
    truncated = counts.pop("truncated")
    masked = counts.pop("labels_masked", {})
    entry["oov"] = counts
    entry["labels_masked"] = masked  # per task, in the rows read that oov counts (--missing-labels mask)
    if truncated:
        entry["truncated"] = truncated
    when = f" in epoch {counts['epoch']}" if counts["epoch"] is not None else "; no epoch was read whole"
    text = oov_text(entry["path"], "--data", entry["oov"], when)
    if text:
        run.log.warn(text)
    text = masked_text(entry["path"], "--data", masked, counts["rows_read"], when)
    if text:
        run.log.info(text)
    if truncated:
        max_len = {f.name: f.max_len for f in run.inputs.source.schema.sequences}
        cut = {c: (n, max_len[c]) for c, n in truncated.items()}
        run.log.warn(f"{truncation_message('--data ' + entry['path'], cut)} (of {counts['rows_read']} rows read{when})")
    record = {"oov": entry["oov"], "labels_masked": masked, **({"truncated": truncated} if truncated else {})}
    run.metrics.write({"step": p.step, "epoch": p.epoch, "data": {"train": record}})


def _every(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


# ---------------------------------------------------------------------------- stopping


def _stop_requested(run: Run) -> bool:
    """SIGTERM/SIGINT received; distributed, by any process before the last step (all agree)."""
    return run.reduce.stop if run.reduce is not None else bool(run.stop.signum)


def _raise_if_stopped(run: Run) -> None:
    """After a stop request has been saved: raise Stopped (exit 128 + the signal's number)."""
    if not _stop_requested(run):
        return
    run.stop.signum = run.stop.signum or signal.SIGTERM  # another process was asked to stop
    run.dist.barrier()  # rank 0 has saved: no process exits before
    name = signal.Signals(run.stop.signum).name + (" (Ctrl-C)" if run.stop.signum == signal.SIGINT else "")
    raise Stopped(
        f"stopped by {name} at step {run.progress.step} of {run.total} after {duration(_session_seconds(run))}; "
        f"state saved in {run.out / 'last.safetensors'}; rerun the same command to resume",
        run.stop.signum,
    )


def _session_seconds(run: Run) -> float:
    return time.time() - run.session_started


def _measure(run: Run) -> dict:
    """Transference on the fixed batches, without the per-batch provenance (the same at every step)."""
    from cogradctl.transference import measure

    cfg, inputs = run.cfg, run.inputs
    result = measure(
        inputs.model,
        inputs.split,
        inputs.source.schema,
        run.measure_rows,
        MEASURE_BATCHES,
        min(MEASURE_BATCH_SIZE, cfg.batch_size),
        seed=cfg.seed,
        device=run.device,
    )
    result.pop("measured")
    return result


def _result(run: Run) -> dict:
    """The run's summary (``train --json``). ``after`` is the last evaluation, of the final weights
    (``last.safetensors``; ``after_step``); ``best`` the best one (``best.safetensors``), with the
    tasks its mean AUC averages and those without an AUC on --valid."""
    p, has_valid = run.progress, run.has_valid
    binary = any(t.type == "binary" for t in run.inputs.source.schema.tasks)
    best = {"score": p.best_score, "auc": p.best_score if binary else None, "step": p.best_step, "valid": p.best_eval}
    if has_valid and p.last_eval is not None:
        best["averaged"], best["without_auc"] = score_tasks(p.last_eval)
        if not best["averaged"]:  # no AUC on --valid: the score is -mean MSE (or there is none)
            best["auc"] = None
    now = time.time()
    return {
        "method": run.cfg.method,
        "steps": p.step,
        "epochs": p.epoch - (1 if p.batch == 0 else 0),
        "seconds": round(now - run.started, 3),  # training time of every session of the run
        "seconds_session": round(now - run.session_started, 3),  # this session's, from its start
        "sessions": run.sessions,
        "resumed_at_step": run.resumed_at,
        "out": str(run.out),
        "skipped": p.skipped,
        "stopped_early": p.stopped_early,
        "data": run.inputs.data if run.dist.main else None,
        "before": p.before,
        "after": p.last_eval if has_valid else None,
        "after_step": p.evaluated_step if has_valid else None,
        "best": best if has_valid else None,
    }
