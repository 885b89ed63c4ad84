"""The optimizer: which parameters it holds, how it is built and stepped, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.adam import adam as functional_adam

from cogradctl.models import ParamSplit
from cogradctl.taskgrad import flatten_shared
from cogradctl.train.config import TrainConfig


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
