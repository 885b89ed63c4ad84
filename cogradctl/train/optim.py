"""The optimizer: which parameters it holds, how it is built and stepped, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.adam import adam as functional_adam

from cogradctl.models import ParamSplit
from cogradctl.taskgrad import flatten_shared
from cogradctl.train.config import TrainConfig


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], tables: int = 0) -> torch.optim.Optimizer:
    """Adam and AdamW use PyTorch's fused kernel (CPU and CUDA): measured 0.1 ms against 0.47 ms
    for the default loop on the sample MMoE, a step cost that counts against the floor.

    The last ``tables`` parameters (row-sparse embedding tables, ``trainable``) form a second
    parameter group marked ``row_sparse``, which ``optimizer_step`` updates lazily (``lazy_step``)."""

    def groups() -> list[dict]:  # fresh each time: an optimizer fills in the dicts it is given
        out = [{"params": params[: len(params) - tables]}]
        if tables:  # not fused, so its step count stays on the CPU (state._placed)
            out.append({"params": params[len(params) - tables :], "row_sparse": True, "fused": False})
        return out

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    try:
        return kind(groups(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel does not take
        return kind(groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``; for the fused Adam/AdamW of ``make_optimizer``, the same fused kernel
    through torch's functional ``torch.optim.adam.adam``, without ``Optimizer.step``'s per-call
    bookkeeping (step hooks, profiler region, per-parameter state checks), which was 0.25 of the
    0.4 ms an Adam step took inside a small model's training step (ad hoc in-flow timing, mmoe K=2:
    the floor is 14 ms). Anything else, a first step (state not yet created) included, goes
    through ``optimizer.step()``; tests check both paths give identical weights and state.
    """
    for group in optimizer.param_groups:
        if group.get("row_sparse"):  # first, leaving their .grad None: Optimizer.step skips them
            lazy_step(optimizer, group)
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        optimizer.step()
        return
    calls = []
    for group in optimizer.param_groups:
        if group.get("row_sparse"):
            continue
        if (
            not group.get("fused")
            or group["amsgrad"]
            or group["capturable"]
            or group["differentiable"]
            or "decoupled_weight_decay" not in group
        ):
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
            functional_adam(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                fused=True,
                decoupled_weight_decay=group["decoupled_weight_decay"],
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )


def lazy_step(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """One step of the row-sparse group: each table's coalesced sparse ``.grad`` (its touched rows)
    updates those rows only, then ``.grad`` is set to None.

    Adam/AdamW ("lazy Adam"): on the touched rows, exactly torch's Adam/AdamW update (weight decay,
    L2 or decoupled, on those rows), with the step count shared by the whole table; the moments of
    untouched rows are neither decayed nor applied, so those rows do not move. (Dense Adam decays
    every row's moments every step and keeps moving a row by its momentum after the batch stops
    touching it; the two agree on a row's first update and whenever every row is touched.) SGD: the
    touched rows only, with a lazily decayed momentum buffer likewise. State keys are torch's, so a
    checkpoint saves and restores them as any optimizer state (``state.optimizer_tensors``)."""
    sgd = isinstance(optimizer, torch.optim.SGD)
    lr, wd = group["lr"], group["weight_decay"]
    with torch.no_grad():
        for param in group["params"]:
            if param.grad is None:
                continue
            index, grad = param.grad._indices()[0], param.grad._values()
            param.grad = None
            state = optimizer.state[param]
            rows = param.index_select(0, index)
            decoupled = not sgd and group.get("decoupled_weight_decay", False)
            if wd and not decoupled:  # L2: the decay enters the gradient
                grad = grad.add(rows, alpha=wd)
            if sgd:
                if group["momentum"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(param)
                    buf = state["momentum_buffer"]
                    grad = buf.index_select(0, index).mul_(group["momentum"]).add_(grad)
                    buf.index_copy_(0, index, grad)
                param.index_copy_(0, index, rows.add_(grad, alpha=-lr))
                continue
            if not state:
                state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
            state["step"] += 1
            step = float(state["step"])
            beta1, beta2 = group["betas"]
            if wd and decoupled:
                rows.mul_(1 - lr * wd)
            m = state["exp_avg"].index_select(0, index).lerp_(grad, 1 - beta1)
            v = state["exp_avg_sq"].index_select(0, index).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            state["exp_avg"].index_copy_(0, index, m)
            state["exp_avg_sq"].index_copy_(0, index, v)
            denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
            param.index_copy_(0, index, rows.addcdiv_(m, denom, value=-lr / (1 - beta1**step)))


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """``clip_grad_norm_`` over the optimizer's gradients, row-sparse tables' included (the norm
    of a coalesced sparse gradient is that of its values; clip_grad_norm_ refuses sparse tensors)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads = [p.grad._values() if p.grad.is_sparse else p.grad for p in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate of the step after ``step`` steps: linear warmup, then constant, cosine or linear decay to 0."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(total - cfg.warmup_steps, 1)
    t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (0.5 * (1.0 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1.0 - t)


def trainable(model: torch.nn.Module, split: ParamSplit, method) -> tuple[list[torch.nn.Parameter], list[str | None]]:
    """The optimizer's parameters and their checkpoint names: the shared parameters as one flat
    parameter (``flatten_shared``; name None: its state is saved under the shared parameters'
    own names), then every other trainable model parameter, then the method's (``method.<name>``),
    then the row-sparse tables (``split.tables``: ``make_optimizer``'s last group)."""
    flat = flatten_shared(split)
    shared = {id(p) for p in split.shared} if flat is not None else set()
    shared |= {id(p) for p in split.tables}
    params: list[torch.nn.Parameter] = [flat] if flat is not None else []
    names: list[str | None] = [None] if flat is not None else []
    for name, param in model.named_parameters():
        if id(param) not in shared and param.requires_grad:
            params.append(param)
            names.append(name)
    params += list(method.parameters())
    names += [f"method.{n}" for n, _ in method.named_parameters()]
    return params + split.tables, names + split.table_names
