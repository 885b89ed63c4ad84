"""The training loop: fine-tune a checkpoint with a gradient method, evaluate, save.

One step: a forward pass, K backward passes giving the K×P matrix of task gradients on the shared
parameters (and each task's gradient on its own parameters), the method's update written into the
shared parameters' ``.grad``, each task's own gradients scaled by the method's task weight, and an
optimizer step. Outputs in ``out_dir``: ``last.safetensors``, ``best.safetensors`` (best mean
validation AUC), ``metrics.jsonl`` (one JSON object per logged step or evaluation).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import data as data_io
from cogradctl.console import Log
from cogradctl.errors import CogradError, UsageError
from cogradctl.evaluate import evaluate, mean_auc
from cogradctl.methods import get_method
from cogradctl.models import from_checkpoint
from cogradctl.taskgrad import TaskGradients, set_shared_grad

OUTPUTS = ("last.safetensors", "best.safetensors", "metrics.jsonl")


@dataclass
class TrainConfig:
    checkpoint: str
    data: str
    out: str
    method: str = "ew"
    method_options: dict = field(default_factory=dict)
    valid: str | None = None
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    overwrite: bool = False
    measure_every: int | None = None  # every N steps: transference on a few fixed training batches

    def check(self) -> None:
        for name in ("lr", "batch_size", "epochs", "log_every"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UsageError(f"--max-steps must be positive, got {self.max_steps}")
        if self.measure_every is not None and self.measure_every <= 0:
            raise UsageError(f"--measure-every must be positive, got {self.measure_every}")


class NonFiniteError(CogradError):
    exit_code = 1


def train(cfg: TrainConfig, log: Log, plugin_paths: list[str] | None = None) -> dict:
    cfg.check()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    existing = [n for n in OUTPUTS if (out / n).exists()]
    if existing and not cfg.overwrite:
        raise UsageError(f"--out {out}: already holds a run ({', '.join(existing)}); choose another directory or pass --overwrite")
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    ckpt, model, split = from_checkpoint(cfg.checkpoint, plugin_paths, device)
    schema = ckpt.schema
    tasks = schema.task_names
    method = get_method(cfg.method, plugin_paths, **cfg.method_options).to(device)
    method.setup(len(tasks))
    method.segments = [p.numel() for p in split.shared]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_data = data_io.load(cfg.data, schema)
        valid_data = data_io.load(cfg.valid, schema) if cfg.valid else None
    for w in caught:
        log.warn(str(w.message))
    log.info(
        f"training {ckpt.model} on {len(train_data)} rows ({', '.join(tasks)}) with {cfg.method}; "
        f"{split.num_shared} shared parameters; device {device}"
    )

    optimizer = torch.optim.Adam([*model.parameters(), *method.parameters()], lr=cfg.lr)
    grads = TaskGradients(model, split, schema, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total = min(cfg.max_steps or steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.epochs)

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    started = time.time()
    before = evaluate(model, valid_data, schema, device=device) if valid_data else None
    if valid_data is None:
        log.info("no --valid data: skipping evaluation and best.safetensors")
    best = {"auc": mean_auc(before) if before else None, "step": 0}
    history_entry = {
        "run": "train",
        "method": cfg.method,
        "method_options": cfg.method_options,
        "data": cfg.data,
        "seed": cfg.seed,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "from": str(cfg.checkpoint),
        "optimizer": {"name": "adam", "lr": cfg.lr, "betas": list(optimizer.defaults["betas"]), "eps": optimizer.defaults["eps"]},
    }

    def save(path: Path, step: int, epoch: int) -> None:
        entry = {**history_entry, "steps": step, "epochs": epoch, "seconds": round(time.time() - started, 3), "time": _now()}
        state = {k: v for k, v in model.state_dict().items()}
        ckpt_io.save(ckpt_io.Checkpoint(ckpt.model, ckpt.model_config, schema, state, [*ckpt.history, entry], optimizer_extra()), path)

    def optimizer_extra() -> dict[str, torch.Tensor]:
        # Adam's per-parameter state (for measure-transference --lookahead optimizer), by parameter name.
        extra = {}
        for name, param in model.named_parameters():
            st = optimizer.state.get(param)
            if st:
                extra[f"optim.exp_avg.{name}"] = st["exp_avg"]
                extra[f"optim.exp_avg_sq.{name}"] = st["exp_avg_sq"]
                extra[f"optim.step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
        return extra

    if before is not None:
        save(out / "best.safetensors", 0, 0)
    step, epoch, seconds = 0, 0, {}
    with open(metrics_path, "w", encoding="utf-8") as metrics_file, warnings.catch_warnings(record=True) as method_warnings:
        warnings.simplefilter("always")

        def write(record: dict) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        if before is not None:
            write({"step": 0, "epoch": 0, "valid": before["tasks"]})
        model.train()
        with log.progress(f"train {cfg.method}", total) as advance:
            while step < total:
                epoch += 1
                for index in data_io.iterate(train_data, cfg.batch_size, shuffle=True, generator=generator):
                    inputs, labels = train_data.batch(index, device)
                    try:
                        losses, g = train_step(grads, method, optimizer, inputs, labels)
                    except NonFiniteError as exc:
                        raise NonFiniteError(f"{exc} at step {step + 1}; the last good weights are in "
                                             f"{out / 'best.safetensors'} (if evaluated); lower --lr") from None
                    step += 1
                    if step % cfg.log_every == 0 or step == 1 or step == total:
                        record = step_record(step, epoch, tasks, losses, g)
                        if method.stats:
                            record["method"] = method.stats
                        write(record)
                    if cfg.measure_every and step % cfg.measure_every == 0:
                        write({"step": step, "epoch": epoch, "transference": measure_during_training(model, split, schema, train_data, cfg, device)})
                    advance(loss=f"{float(losses.sum()):.4f}")
                    for w in method_warnings:
                        log.warn(str(w.message))
                    method_warnings.clear()
                    if step >= total:
                        break
                if valid_data is not None:
                    result = evaluate(model, valid_data, schema, device=device)
                    write({"step": step, "epoch": epoch, "valid": result["tasks"]})
                    auc = mean_auc(result)
                    log.info(f"epoch {epoch} step {step}: valid " + _summary(result))
                    if auc is not None and (best["auc"] is None or auc > best["auc"]):
                        best = {"auc": auc, "step": step}
                        save(out / "best.safetensors", step, epoch)
                    after = result
    seconds = time.time() - started
    save(out / "last.safetensors", step, epoch)
    result = {
        "method": cfg.method,
        "steps": step,
        "epochs": epoch,
        "seconds": round(seconds, 3),
        "out": str(out),
        "before": before,
        "after": after if valid_data is not None else None,
        "best": best if valid_data is not None else None,
    }
    return result


def train_step(grads: TaskGradients, method, optimizer: torch.optim.Optimizer, inputs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: per-task gradients, the method's update on the shared parameters,
    each task's weighted gradient on its own parameters, an optimizer step. → (losses, K×P grads)."""
    split, tasks = grads.split, grads.tasks
    requires_hvp = getattr(method, "requires_hvp", False)
    losses, g, own = grads(inputs, labels, create_graph=requires_hvp)
    finite = torch.isfinite(losses) & torch.isfinite(g).all(dim=1)
    if not bool(finite.all()):
        bad = [t for t, ok in zip(tasks, finite.tolist()) if not ok]
        raise NonFiniteError(f"non-finite loss or gradient for task(s) {', '.join(bad)}")
    update = method(g, losses, hvp=grads.hvp()) if requires_hvp else method(g, losses)
    optimizer.zero_grad(set_to_none=True)
    set_shared_grad(split, update)
    weights = method.task_weights()
    for k, task in enumerate(tasks):
        w = 1.0 if weights is None else float(weights[k])
        for param, grad in zip(split.tasks[task], own[task]):
            param.grad = grad * w if w != 1.0 else grad
    optimizer.step()
    return losses, g


MEASURE_BATCHES, MEASURE_BATCH_SIZE = 4, 256  # --measure-every: cheap, and the same batches every time


def measure_during_training(model, split, schema, train_data, cfg: TrainConfig, device) -> dict:
    """Transference on MEASURE_BATCHES fixed (seeded by --seed) training batches, without the
    per-batch provenance (it is the same at every step)."""
    from cogradctl.transference import measure

    result = measure(model, split, schema, train_data, MEASURE_BATCHES, min(MEASURE_BATCH_SIZE, cfg.batch_size), seed=cfg.seed, device=device)
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
