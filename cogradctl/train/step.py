"""One optimisation step (``train_step``) and its precision helpers (autocast, fp16 loss scaling).

A forward pass, K backward passes giving the K×P matrix of task gradients on the shared parameters
(and each task's gradient on its own parameters), the method's update written into the shared
parameters' ``.grad``, each task's own gradients scaled by the method's task weight, and an
optimizer step.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from cogradctl.distributed import StepReducer
from cogradctl.errors import Diverged
from cogradctl.taskgrad import TaskGradients, set_shared_grad
from cogradctl.train.optim import clip_gradients, optimizer_step


def train_step(
    grads: TaskGradients,
    method,
    optimizer: torch.optim.Optimizer,
    inputs,
    labels,
    autocast: Autocast | None = None,
    scaler: LossScaler | None = None,
    grad_clip: float | None = None,
    reduce: StepReducer | None = None,
    stop: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One optimisation step: per-task gradients, the method's update on the shared parameters,
    each task's weighted gradient on its own parameters, an optimizer step. → (losses, K×P grads).

    With fp16, each task's loss is multiplied by the loss scale before its backward pass and every
    per-task gradient is divided by it before the method sees them; an overflow skips the step
    and halves the scale. A non-finite loss or gradient otherwise raises Diverged (naming the tasks).

    Partial labels (``grads.denominators``, see ``taskgrad.masked_losses``): a task with no
    observed row of positive weight in the batch has loss 0 and a zero gradient row; the method
    is then called with ``observed``, the K bool tensor of the tasks that had some.

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
    # Each loss's denominator (masked_losses): the observed rows' weights; None from a stand-in
    # that has none (every task observed).
    d = getattr(grads, "denominators", None)
    # Row-sparse embedding tables (cogradctl/tables.py): g holds their touched rows; with
    # --embeddings sum the method sees the dense columns only and the tables get the sum.
    sparse = getattr(grads, "tables", None) is not None
    if reduce is not None:
        n = 0 if inputs is None else len(labels)
        reduced = reduce(n, losses, grads.grads if sparse else g, own, stop, d)
        if reduced is None:
            return None
        losses, own = reduced
        d = reduce.denominators
        if sparse:  # the union of the processes' touched rows: exchanged, not the whole tables
            g = grads.exchanged(reduce)
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
    extra = {"hvp": hvp} if requires_hvp else {}
    if d is not None and not bool((d > 0).all()):
        # A task without an observed row of positive weight in the (global) batch: its loss is 0 and
        # its gradient row zero; the method is told which tasks were observed.
        extra["observed"] = d > 0
    coordinated = grads.coordinated(g, method) if sparse else g
    update = method(coordinated, losses, **extra)
    if sparse:
        grads.set_update(update)
    else:
        set_shared_grad(split, update)
    weights = method.task_weights()
    for k, task in enumerate(tasks):
        w = 1.0 if weights is None else float(weights[k])
        for param, grad in zip(split.tasks[task], own[task]):
            param.grad = grad * w if w != 1.0 else grad
    if grad_clip is not None:
        clip_gradients(optimizer, grad_clip)
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
        self.ctx = (
            None
            if precision == "fp32"
            else torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        )

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


@contextmanager
def _nothing():
    yield
