"""Evaluating on --valid and saving: ``best.safetensors`` when the score improves, ``last.safetensors``
with everything needed to resume."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl.console import counted
from cogradctl.errors import Diverged
from cogradctl.evaluate import evaluate, mean_auc
from cogradctl.train.logs import summary
from cogradctl.train.report import masked_text, oov_text, stream_oov
from cogradctl.train.run import Run
from cogradctl.train.state import optimizer_tensors


def evaluate_now(run: Run) -> None:
    """Evaluate on --valid (once per step), keep the best, and decide early stopping (rank 0's
    decision, shared with every process)."""
    cfg, p = run.cfg, run.progress
    if p.evaluated_step == p.step:
        return
    p.evaluated_step = p.step
    if run.dist.main:
        result = evaluate(
            run.inputs.model, run.inputs.valid, run.inputs.source.schema, device=run.device, standard_errors=True
        )
        record_evaluation(run, result)
        run.inputs.model.train()
    if run.dist.from_main(bool(cfg.early_stopping) and p.bad_evals >= (cfg.early_stopping or 0)):
        p.stopped_early = True
        run.log.info(
            f"early stopping at step {p.step}: no better validation score in "
            f"{counted(cfg.early_stopping, 'evaluation')}"
        )


def record_evaluation(run: Run, result: dict) -> dict:
    """Log an evaluation; save ``best.safetensors`` when its score is the best so far."""
    p = run.progress
    if not run.valid_reported:
        report_valid(run, result)
    score = validation_score(result)
    run.metrics.write({"step": p.step, "epoch": p.epoch, "valid": result["tasks"], "score": score})
    if run.tensorboard:
        run.tensorboard.scalars(
            p.step,
            {
                f"valid/{t}/{k}": v
                for t, m in result["tasks"].items()
                for k, v in m.items()
                if k not in ("auc_se", "rows", "weight")
            },
        )
    run.log.info(f"step {p.step} (epoch {p.epoch}): valid " + summary(result))
    if score is not None and (p.best_score is None or score > p.best_score):
        check_finite(run, together=False)  # rank 0 alone evaluates
        p.best_score, p.best_step, p.bad_evals, p.best_eval = score, p.step, 0, result
        ckpt_io.save(snapshot(run, finished=False), run.out / "best.safetensors")
    else:
        p.bad_evals += 1
    p.last_eval = result
    return result


def report_valid(run: Run, result: dict) -> None:
    """After this session's first evaluation (a whole pass over --valid): the categorical values
    unseen at init that it met, and the tasks without an AUC (one class only in --valid's rows
    used), which the validation score leaves out; a warning each, and a ``data`` record."""
    run.valid_reported = True
    entry = run.inputs.data.get("valid")
    if entry is None:
        return
    entry["oov"] = stream_oov(run.inputs.valid)
    text = oov_text(entry["path"], "--valid", entry["oov"])
    if text:
        run.log.warn(text)
    masked = {
        t: result["rows"] - m["rows"]
        for t, m in result["tasks"].items()
        if m.get("rows", result["rows"]) < result["rows"]
    }
    entry["labels_masked"] = masked  # per task: null labels each evaluation leaves out (--missing-labels mask)
    text = masked_text(entry["path"], "--valid", masked, result["rows"])
    if text:
        run.log.info(text)
    averaged, no_auc = score_tasks(result)
    entry["tasks_without_auc"] = no_auc
    if no_auc:
        run.log.warn(
            f"--valid {entry['path']}: {_listed(no_auc, 'task')} {'has' if len(no_auc) == 1 else 'have'} no AUC "
            f"(the labels in its {entry['rows_used']} rows used are all of one class); the validation score "
            "(best.safetensors, --early-stopping) is the mean AUC of "
            + (_listed(averaged, "task") + " only" if averaged else "no task: there is none")
        )
    p = run.progress
    run.metrics.write({"step": p.step, "epoch": p.epoch, "data": {"valid": entry}})


def score_tasks(result: dict) -> tuple[list[str], list[str]]:
    """(binary tasks the mean AUC averages, binary tasks without an AUC) of an evaluation."""
    binary = {t: m for t, m in result["tasks"].items() if "auc" in m}
    return [t for t, m in binary.items() if m["auc"] is not None], [t for t, m in binary.items() if m["auc"] is None]


def _listed(names: list[str], noun: str) -> str:
    return f"{noun}{'s' if len(names) != 1 else ''} " + ", ".join(names)


def validation_score(result: dict) -> float | None:
    """Higher is better: the mean AUC of the binary tasks that have one (a task whose --valid labels
    are all of one class has none: left out, and named by ``report_valid``), or minus the mean MSE
    of the regression tasks if no task has an AUC."""
    auc = mean_auc(result)
    if auc is not None:
        return auc
    mses = [m["mse"] for m in result["tasks"].values() if m.get("mse") is not None]
    return -sum(mses) / len(mses) if mses else None


def save_last(run: Run, finished: bool = False, initial: bool = False) -> None:
    """Save the state to resume from. ``initial``: the first write of a new run, before its
    starting point is recorded; a rerun of the same command starts such a run again."""
    check_finite(run)
    if run.dist.main:
        ckpt_io.save(snapshot(run, finished, initial), run.out / "last.safetensors")
    run.saved_step = run.progress.step


def check_finite(run: Run, together: bool = True) -> None:
    """Non-finite weights are never saved (nor does the run end 0 with them): Diverged naming the
    first such tensor and the state that last.safetensors keeps. ``together``: every process
    checks (the same weights) and raises at once."""
    weights = {n: t for n, t in run.inputs.model.state_dict().items() if t.is_floating_point()}
    if not weights or bool(torch.stack([finite(t) for t in weights.values()]).all()):
        return  # one device sync for the whole model
    for name, tensor in weights.items():
        if not bool(finite(tensor)):
            if together:
                run.dist.barrier()
            raise Diverged(
                f"the weights are non-finite after step {run.progress.step} ({name}); not saved: "
                f"{kept_state(run)}; lower --lr"
            )


def finite(tensor: torch.Tensor) -> torch.Tensor:
    """Whether every number of a floating-point tensor is finite: a 0-d bool tensor on its device,
    computed without a temporary of the tensor's size (``isfinite(t).all()`` makes several: GBs for
    large tables, at every save). The smallest and the largest value are finite exactly when every
    value is (a NaN propagates to both)."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


def kept_state(run: Run) -> str:
    """What last.safetensors holds now, for the messages of a run that stops on non-finite numbers."""
    if run.saved_step is None:
        return "no state was saved"
    return f"{run.out / 'last.safetensors'} keeps the state saved at step {run.saved_step}"


def snapshot(run: Run, finished: bool, initial: bool = False) -> ckpt_io.Checkpoint:
    """The checkpoint of the run as it is now: weights, history, and the state to resume from."""
    source, p, method = run.inputs.source, run.progress, run.inputs.method
    seconds = time.time() - run.started
    entry = {**run.history_entry, "steps": p.step, "epochs": p.epoch, "seconds": round(seconds, 3), "time": now()}
    identity = run.cfg.identity(run.dist.world, run.inputs.batches.shards)
    training_state = {
        **asdict(p),
        "finished": finished,
        "seconds": seconds,  # training time over every session of the run
        "sessions": run.sessions,
        "total_steps": run.total,
        "config": identity,
    }
    if initial:
        training_state["initial"] = True
    extra = {
        **optimizer_tensors(run.optimizer, run.names, run.inputs.split),
        **{f"method.{k}": v for k, v in method.state_dict().items()},
        "rng.torch": torch.get_rng_state(),
    }
    if run.device.type == "cuda":
        extra["rng.cuda"] = torch.cuda.get_rng_state(run.device)
    if run.scaler is not None:
        extra["scaler.scale"] = torch.tensor([run.scaler.scale, float(run.scaler.good_steps)], dtype=torch.float64)
    return ckpt_io.Checkpoint(
        source.model,
        source.model_config,
        source.schema,
        run.inputs.model.state_dict(),
        [*source.history, entry],
        extra,
        training_state,
    )


def now() -> str:
    """The current UTC time as an ISO 8601 string (checkpoint history entries)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
