"""Per-task losses and gradients: one forward, then K backward passes onto the shared parameters.

Task i's gradient on the shared parameters is written into row i of one preallocated K×P buffer;
its gradient on its own task-specific parameters comes out of the same backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cogradctl import labels as label_io
from cogradctl.models import ParamSplit
from cogradctl.schema import Schema
from cogradctl.tables import TableRows


def task_losses(outputs: dict[str, torch.Tensor], labels: torch.Tensor, schema: Schema) -> torch.Tensor:
    """The K-vector of per-task losses (:func:`masked_losses` without the denominators)."""
    return masked_losses(outputs, labels, schema)[0]


def masked_losses(
    outputs: dict[str, torch.Tensor], labels: torch.Tensor, schema: Schema
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the K-vector of per-task losses, their K denominators): BCE on logits for binary tasks, MSE
    for regression, task k's loss the weighted mean over its observed rows,

        L_k = Σ_i w_i m_ik l_ik / d_k,   d_k = Σ_i w_i m_ik,

    with m_ik = 1 where row i's label of task k is observed (not NaN) and w_i the row's weight (1
    without a weight column; :mod:`cogradctl.labels`). A task with d_k = 0 (no observed row of
    positive weight) has loss 0 and, through it, a zero gradient. With every label observed and no
    weights this is the plain mean (computed as such) and d_k = B."""
    k = len(schema.tasks)
    y, observed, weight = label_io.split(labels, k)
    if weight is None and bool(observed.all()):
        losses = []
        for j, task in enumerate(schema.tasks):
            out = outputs[task.name].float()
            if task.type == "binary":
                losses.append(F.binary_cross_entropy_with_logits(out, y[:, j]))
            else:
                losses.append(F.mse_loss(out, y[:, j]))
        return torch.stack(losses), torch.full((k,), float(len(y)), device=labels.device)
    w = observed.float() if weight is None else observed.float() * weight.float()[:, None]
    target = torch.where(observed, y, torch.zeros_like(y))  # a NaN label must not reach the loss (0·NaN = NaN)
    losses = []
    for j, task in enumerate(schema.tasks):
        out = outputs[task.name].float()
        if task.type == "binary":
            per_row = F.binary_cross_entropy_with_logits(out, target[:, j], reduction="none")
        else:
            per_row = F.mse_loss(out, target[:, j], reduction="none")
        losses.append(torch.where(w[:, j] > 0, per_row * w[:, j], torch.zeros_like(per_row)).sum())
    denominators = w.sum(dim=0)
    return torch.stack(losses) / denominators.clamp_min(torch.finfo(torch.float32).tiny), denominators


class TaskGradients:
    """Computes, for one batch, the K losses, the K×P shared-gradient matrix and each task's own gradients."""

    def __init__(
        self,
        model: torch.nn.Module,
        split: ParamSplit,
        schema: Schema,
        device: torch.device | str = "cpu",
        own: bool = True,
        sum_tables: bool = False,
    ) -> None:
        """``own=False``: gradients on the shared parameters only (measurement needs no others).

        With row-sparse tables (``split.tables``, see :mod:`cogradctl.tables`) a call returns the
        K × (P + touched rows × dim) matrix, the columns in the model's parameter order;
        ``sum_tables``: the method is to see the P dense columns only (``coordinated``) and the
        tables get the plain sum of the task gradients (``set_update``)."""
        self.model, self.split, self.schema = model, split, schema
        self.own = own
        self.tasks = schema.task_names
        k, p = len(self.tasks), split.num_shared
        self.sum_tables = sum_tables
        self.tables = TableRows(model, split, k) if split.tables else None
        self.segments = [q.numel() for q in split.shared]  # of the matrix of the last call
        self.grads = torch.empty(k, p, device=device, dtype=split.shared[0].dtype)
        # views[i][n]: the slice of row i that holds shared parameter n, shaped like it.
        self.views = []
        for i in range(k):
            row, offset = [], 0
            for param in split.shared:
                row.append(self.grads[i, offset : offset + param.numel()].view_as(param))
                offset += param.numel()
            self.views.append(row)
        self._graph_grads: list[tuple[torch.Tensor, ...]] = []
        self.denominators: torch.Tensor | None = None  # of the last call's losses (K), see __call__

    def __call__(
        self,
        inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        create_graph: bool = False,
        loss_scale: float | None = None,
    ):
        """→ (losses K-vector detached, grads K×P (the shared buffer, overwritten next call),
        {task: gradients of its own parameters}). With ``loss_scale`` (fp16), each loss is
        multiplied by it before its backward pass and every gradient divided by it afterwards.
        ``self.denominators`` is then the K-vector of each loss's denominator (``masked_losses``:
        the observed rows' weights; 0 for a task absent from the batch)."""
        if self.tables is not None:
            if create_graph:
                raise ValueError("row-sparse tables: Hessian-vector products are not supported")
            self.tables.reset()
        outputs = self.model(inputs)
        losses, self.denominators = masked_losses(outputs, labels, self.schema)
        if create_graph:
            return self._with_graph(losses)
        scaled = losses * loss_scale if loss_scale is not None else losses
        own: dict[str, list[torch.Tensor]] = {}
        last = len(self.tasks) - 1
        self.grads.zero_()
        tables = self.split.tables
        if self.tables is not None:
            self.tables.touched(self.grads.device, self.grads.dtype)
        for i, task in enumerate(self.tasks):
            # Each backward pass accumulates straight into row i of the buffer: the shared
            # parameters' .grad are views of it. The task's own parameters get fresh gradients
            # in the same pass; the last pass frees the graph. A row-sparse table's sparse
            # gradient is summed onto its touched rows (``TableRows.add``).
            for param, view in zip(self.split.shared, self.views[i]):
                param.grad = view
            mine = self.split.tasks[task] if self.own else []
            for param in (*mine, *tables):
                param.grad = None
            torch.autograd.backward(scaled[i], inputs=[*self.split.shared, *tables, *mine], retain_graph=i < last)
            own[task] = [torch.zeros_like(p) if p.grad is None else p.grad for p in mine]
            for t, param in enumerate(tables):
                self.tables.add(i, t, param.grad)
                param.grad = None
        for param in self.split.shared:
            param.grad = None
        if loss_scale is not None:
            self.grads.div_(loss_scale)
            if self.tables is not None:
                self.tables.rows.div_(loss_scale)
            for grads in own.values():
                for grad in grads:
                    grad.div_(loss_scale)
        if self.tables is None:
            return losses.detach(), self.grads, own
        self.segments = self.tables.segments()
        return losses.detach(), self.tables.matrix(self.grads), own

    def coordinated(self, g: torch.Tensor, method) -> torch.Tensor:
        """The columns of a call's matrix ``g`` that the method coordinates: all of them, except
        with ``sum_tables`` (the dense shared parameters' only). With row-sparse tables the
        method's ``segments`` are set to this batch's (they change with the touched rows) and its
        ``columns`` to the P the matrix stands for (methods/base.py)."""
        if self.tables is None:
            return g
        if self.sum_tables:
            return self.grads
        method.segments = self.segments
        method.columns = self.split.num_shared + sum(p.numel() for p in self.split.tables)
        return g

    def set_update(self, update: torch.Tensor) -> None:
        """The method's update (on ``coordinated``'s columns) as the shared parameters' ``.grad``
        (``set_shared_grad``) and the tables' coalesced sparse ``.grad`` on their touched rows:
        the update's table columns, or with ``sum_tables`` the sum of the task gradients there."""
        if self.tables is None:
            set_shared_grad(self.split, update)
            return
        if self.sum_tables:
            dense, rows = update, self.tables.rows.sum(dim=0)
        else:
            dense, rows = self.tables.cut(update)
        set_shared_grad(self.split, dense)
        for param, grad in zip(self.split.tables, self.tables.sparse_grads(rows)):
            param.grad = grad

    def exchanged(self, reduce) -> torch.Tensor:
        """Under torchrun with row-sparse tables, after ``reduce`` (a ``StepReducer``) reduced the
        dense columns: the tables' rows of the global batch (the union of every process's touched
        rows, ``reduce.rows``) in place of this process's → the call's matrix for the global batch."""
        self.tables.replace(*reduce.rows(self.tables.index, self.tables.blocks))
        self.segments = self.tables.segments()
        return self.tables.matrix(self.grads)

    def nothing(self):
        """The result of a call on no rows, all zeros: a process out of data in a distributed step
        (with row-sparse tables: no touched rows)."""
        self.grads.zero_()
        if self.tables is not None:
            self.tables.reset()
            self.tables.touched(self.grads.device, self.grads.dtype)
        self.denominators = torch.zeros(len(self.tasks), device=self.grads.device)
        own = {t: [torch.zeros_like(p) for p in self.split.tasks[t]] if self.own else [] for t in self.tasks}
        return torch.zeros(len(self.tasks), device=self.grads.device), self.grads, own

    def _with_graph(self, losses: torch.Tensor):
        """As ``__call__``, keeping the gradients' graphs for Hessian-vector products (``hvp``)."""
        own: dict[str, list[torch.Tensor]] = {}
        n_shared = len(self.split.shared)
        self._graph_grads = []
        for i, task in enumerate(self.tasks):
            params = [*self.split.shared, *self.split.tasks[task]]
            grads = torch.autograd.grad(losses[i], params, retain_graph=True, create_graph=True, allow_unused=True)
            for view, g in zip(self.views[i], grads[:n_shared]):
                view.zero_() if g is None else view.copy_(g.detach())
            own[task] = [
                torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params[n_shared:], grads[n_shared:])
            ]
            self._graph_grads.append(grads[:n_shared])
        return losses.detach(), self.grads, own

    def hvp(self) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """After a call with ``create_graph=True``: ``fn(i, v)`` = H_i v, task i's Hessian on the
        shared parameters times a P-vector v (one double-backward pass each)."""
        graph = self._graph_grads
        shared = self.split.shared

        def fn(i: int, v: torch.Tensor) -> torch.Tensor:
            dot = sum((g * chunk.view_as(g)).sum() for g, chunk in zip(graph[i], _chunks(v, shared)) if g is not None)
            out = torch.autograd.grad(dot, shared, retain_graph=True, allow_unused=True)
            return torch.cat(
                [torch.zeros(p.numel(), device=v.device) if o is None else o.reshape(-1) for p, o in zip(shared, out)]
            )

        return fn


def _chunks(v: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return list(torch.split(v, [p.numel() for p in params]))


def flatten_shared(split: ParamSplit) -> torch.nn.Parameter | None:
    """Make the shared parameters slices of one flat P-vector parameter (``split.flat``, returned).

    The optimizer then steps the shared part as one tensor, whose gradient is the method's update
    itself: no per-tensor views to set, one fused Adam call instead of one per tensor (on the
    sample MMoE, 29 parameter tensors → 13: about 1.3% of a K = 2 step, measured in-flow ad hoc).
    The model is unchanged otherwise: its parameters keep their names, shapes and values (their
    ``.data`` now lies in the flat vector), so forward, backward, ``state_dict`` and in-place
    loads work as before; anything that replaces a shared parameter's storage afterwards
    (``model.to(...)``, assigning ``.data``) would cut the link, so call it last. Returns None,
    changing nothing, unless the shared parameters are dense and share one dtype and device.
    """
    if split.flat is not None:
        return split.flat
    first = split.shared[0]
    if any(p.dtype != first.dtype or p.device != first.device or p.layout != torch.strided for p in split.shared):
        return None
    flat = torch.nn.Parameter(flat_shared(split))
    for param, piece in zip(split.shared, _chunks(flat.data, split.shared)):
        param.data = piece.view_as(param)
    split.flat = flat
    return flat


def set_shared_grad(split: ParamSplit, update: torch.Tensor) -> None:
    """The P-vector ``update`` as the shared parameters' gradient: the flat parameter's ``.grad``
    after ``flatten_shared``, else each parameter's ``.grad`` a view of its slice (no copy: the
    method returns a fresh tensor each step, so nothing else writes to it)."""
    if split.flat is not None:
        split.flat.grad = update
        return
    for param, chunk in zip(split.shared, _chunks(update, split.shared)):
        param.grad = chunk.view_as(param)


def flat_shared(split: ParamSplit) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in split.shared])


def unflatten_shared(split: ParamSplit, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A P-vector as {shared parameter name: tensor}, for ``torch.func.functional_call``."""
    return {n: c.view_as(p) for n, p, c in zip(split.shared_names, split.shared, _chunks(flat, split.shared))}
