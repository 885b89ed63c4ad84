"""Shared embedding tables trained row-sparse (``train --embeddings``).

A batch touches a few rows of a ranking model's embedding tables, but on the dense path every row
is a column of the K×P matrix of task gradients, and the method and the optimizer walk all of them.
Here the weight of every shared ``nn.Embedding``/``nn.EmbeddingBag`` (found by module type) leaves
``split.shared`` for ``split.tables``; its module is switched to ``sparse=True`` and, per batch,
``TableRows`` records the rows the lookups touched (unique indices, ``padding_idx`` left out) and
sums each task's sparse gradient onto them (duplicate lookups summed). Rows no lookup touched have
a zero gradient in every task, so a method defined on the gradients gives on the touched rows the
update it gives on the dense path, and zero elsewhere (tests/test_embeddings.py checks this against
the dense path).

Modes: ``coordinate`` (the method sees the K × (dense P + touched rows × dim) matrix), ``sum``
(tables get the plain sum of the task gradients; the method sees the dense shared parameters only),
``freeze`` (tables fixed), ``dense`` (every row a column, as before), ``auto`` (``coordinate`` when
the shared tables hold at least ``AUTO_ELEMENTS`` numbers, else ``dense``).
"""

from __future__ import annotations

from itertools import accumulate

import numpy as np
import torch
from torch import nn

from cogradctl.errors import UsageError
from cogradctl.models import ParamSplit

MODES = ("auto", "coordinate", "sum", "freeze", "dense")
# auto: coordinate from 2^24 table numbers on (64 MiB in float32: e.g. one hash:2^20 feature × 16),
# where the dense K×P matrix and the walk over every row start to dominate a step; dense below, so
# small models keep dense Adam exactly as before.
AUTO_ELEMENTS = 1 << 24


def embedding_tables(model: nn.Module, split: ParamSplit) -> list[tuple[str, nn.Module]]:
    """The shared parameters that are the weight of an Embedding/EmbeddingBag: (name, module)."""
    shared = {id(p): n for n, p in zip(split.shared_names, split.shared)}
    shared.update({id(p): n for n, p in zip(split.table_names, split.tables)})
    found, seen = [], set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and id(module.weight) in shared:
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                found.append((shared[id(module.weight)], module))
    return found


def resolve(mode: str, model: nn.Module, split: ParamSplit) -> str:
    """The mode a run uses: ``auto`` decided by the tables' size; ``dense`` when there are none."""
    tables = embedding_tables(model, split)
    if not tables:
        return "dense"
    if mode != "auto":
        return mode
    numbers = sum(m.weight.numel() for _, m in tables)
    return "coordinate" if numbers >= AUTO_ELEMENTS else "dense"


def separate(model: nn.Module, split: ParamSplit, mode: str) -> None:
    """Take the shared tables out of ``split.shared`` for a row-sparse mode (``coordinate``/``sum``:
    their modules switched to sparse gradients) or ``freeze`` (no gradient); ``dense`` changes nothing."""
    if mode == "dense":
        return
    if split.flat is not None:
        raise ValueError("separate the tables before flatten_shared")
    tables = embedding_tables(model, split)
    ids = {id(m.weight) for _, m in tables}
    kept = [(n, p) for n, p in zip(split.shared_names, split.shared) if id(p) not in ids]
    if not kept:
        raise UsageError(
            f"--embeddings {mode}: the model's only shared parameters are its embedding tables "
            "(nothing else for the method to coordinate); use --embeddings dense"
        )
    split.shared_names, split.shared = [n for n, _ in kept], [p for _, p in kept]
    for _, module in tables:
        if mode == "freeze":
            module.weight.requires_grad_(False)
        else:
            module.sparse = True
            split.tables.append(module.weight)
            split.table_names.append(next(n for n, m in tables if m is module))


def probe(model: nn.Module, split: ParamSplit, mode: str, inputs: dict) -> None:
    """Before anything is written: one forward pass on ``inputs`` (eval mode, no buffer changes) and
    the gradient of the outputs onto each row-sparse table must come through its module's lookups
    only: sparse, and on rows those lookups touched. A weight also used otherwise (tied to an
    output layer, read with ``F.embedding``) would get a dense gradient (``TableRows.add`` refuses
    it at the first step, after the step-0 checkpoint) or rows the step never sees: UsageError."""
    if not split.tables:
        return
    modules = {id(m.weight): m for _, m in embedding_tables(model, split)}
    looked: dict[int, list[torch.Tensor]] = {id(p): [] for p in split.tables}
    handles = [
        modules[id(p)].register_forward_pre_hook(lambda m, args: looked[id(m.weight)].append(args[0].reshape(-1)))
        for p in split.tables
    ]
    training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            outputs = model(inputs)
            total = sum(v.float().sum() for v in outputs.values())
            grads = torch.autograd.grad(total, split.tables, allow_unused=True)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    for name, param, grad in zip(split.table_names, split.tables, grads):
        if grad is None:
            continue
        seen = torch.cat(looked[id(param)]) if looked[id(param)] else grad.new_zeros(0, dtype=torch.long)
        if not grad.is_sparse:
            how = "a dense gradient: the weight is also used outside its module's lookups (tied to another layer?)"
        elif not bool(torch.isin(grad.coalesce().indices()[0], seen).all()):
            how = "gradient on rows its module did not look up (the weight read with F.embedding?)"
        else:
            continue
        raise UsageError(
            f"--embeddings {mode}: table parameter {name} gets {how}; the row-sparse path sees only the rows "
            "its module looks up; use --embeddings dense"
        )


class TableRows:
    """Per batch: the rows each table's lookups touched, and each task's gradient on them.

    ``reset`` before the forward pass; ``touched()`` after it; ``add(i, t, grad)`` after task i's
    backward pass with table t's sparse gradient; ``rows`` is the K × Σ_t (touched_t × dim_t)
    matrix, table after table, each table's block row-major (one touched row's dim numbers together).
    """

    def __init__(self, model: nn.Module, split: ParamSplit, num_tasks: int) -> None:
        self.split, self.k = split, num_tasks
        self.modules = [m for _, m in embedding_tables(model, split) if any(m.weight is p for p in split.tables)]
        order = {id(p): t for t, p in enumerate(split.tables)}
        self.modules.sort(key=lambda m: order[id(m.weight)])
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.modules]
        self.hooks = [module.register_forward_pre_hook(self._recorder(t)) for t, module in enumerate(self.modules)]
        self.layout = _layout(model, split)
        self.starts = list(accumulate([0, *(p.numel() for p in split.shared)]))  # dense columns
        self.recording = False  # between reset and touched: lookups outside a training step are not kept
        self.index: list[torch.Tensor] = []
        self.rows = torch.empty(0)
        self.sizes: list[int] = []

    def _recorder(self, t: int):
        def hook(module, args):
            if self.recording and torch.is_grad_enabled():
                self.inputs[t].append(args[0].detach().reshape(-1))

        return hook

    def reset(self, recording: bool = True) -> None:
        for seen in self.inputs:
            seen.clear()
        self.recording = recording

    def touched(self, device, dtype) -> None:
        """The unique looked-up rows of each table (sorted), and a zeroed K × Σ rows·dim matrix."""
        index, self.lookups = [], []
        for module, seen in zip(self.modules, self.inputs):
            looked = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.long, device=device)
            ids, inverse = _unique(looked)
            # (lookups, their touched row): a gradient whose indices are the lookups in order (one
            # lookup call, no padding row) is summed by position, without a search
            self.lookups.append((looked, inverse))
            if module.padding_idx is not None:  # its gradient is zero by definition: not a touched row
                ids = ids[ids != module.padding_idx % module.num_embeddings]
                self.lookups[-1] = None
            index.append(ids)
        self.reset(recording=False)
        self._hold(index, lambda width: torch.zeros(self.k, width, device=device, dtype=dtype))

    def replace(self, index: list[torch.Tensor], rows: torch.Tensor) -> None:
        """Other touched rows (``index``, sorted) and their K × Σ rows·dim matrix in ``rows``'s layout,
        in place of the batch's: under torchrun the union of every process's, ``StepReducer.rows``."""
        self.lookups = [None] * len(index)
        self._hold(index, lambda width: rows)

    def _hold(self, index: list[torch.Tensor], matrix) -> None:
        """Hold ``index`` (each table's touched rows) and ``matrix(width)``, their K × width matrix
        (width = Σ rows·dim), cut into each table's K × rows × dim block."""
        self.index = index
        self.sizes = [ids.numel() * m.embedding_dim for ids, m in zip(index, self.modules)]
        self.rows = matrix(sum(self.sizes))
        self.blocks = [
            b.view(self.k, -1, m.embedding_dim) for b, m in zip(self.rows.split(self.sizes, 1), self.modules)
        ]

    def add(self, i: int, t: int, grad: torch.Tensor | None) -> None:
        """Task i's gradient on table t (sparse, uncoalesced: one entry per lookup) onto its touched rows."""
        if grad is None:
            return
        if not grad.is_sparse:
            raise UsageError(
                f"--embeddings: table {self.split.table_names[t]} got a dense gradient (its weight is used "
                "other than through its module's lookups: tied to an output layer, or read with "
                "F.embedding); use --embeddings dense"
            )
        indices, values = grad._indices()[0], grad._values()
        lookups = self.lookups[t]
        if lookups is not None and lookups[0].shape == indices.shape and torch.equal(lookups[0], indices):
            position = lookups[1]
        else:
            position = torch.searchsorted(self.index[t], indices)
        self.blocks[t][i].index_add_(0, position, values.to(self.rows.dtype))

    def matrix(self, dense: torch.Tensor) -> torch.Tensor:
        """The K × (P + Σ rows·dim) matrix: the dense shared parameters' columns (``dense``) and the
        tables' touched rows, in the order of the model's parameters (the dense path's order, so a
        method applied per tensor block meets the blocks in the same order)."""
        starts = self.starts
        pieces = [dense[:, starts[a] : starts[b]] if kind == "dense" else self.rows_of(a) for kind, a, b in self.layout]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def close(self) -> None:
        """Remove the lookup recorders from the table modules (a measurement's ``TableRows`` lives
        for one measurement; the modules outlive it, in a training run)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def spans(self) -> dict[str, tuple[int, int]]:
        """{shared parameter name: (first, last + 1) of its columns in ``matrix``}, in column order:
        a dense parameter's every entry, a table's touched rows (``index``, row-major)."""
        names = [*self.split.shared_names, *self.split.table_names]
        width = len(self.split.shared_names)
        keys = [n for kind, a, b in self.layout for n in ([names[width + a]] if kind == "table" else names[a:b])]
        ends = list(accumulate(self.segments()))
        return {n: (end - size, end) for n, end, size in zip(keys, ends, self.segments())}

    def rows_of(self, t: int) -> torch.Tensor:
        start = sum(self.sizes[:t])
        return self.rows[:, start : start + self.sizes[t]]

    def segments(self) -> list[int]:
        """The sizes of the matrix's blocks, one per parameter, in its column order."""
        out = []
        for kind, a, b in self.layout:
            out += (
                [self.sizes[a]]
                if kind == "table"
                else [q - p for p, q in zip(self.starts[a:b], self.starts[a + 1 : b + 1])]
            )
        return out

    def cut(self, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A P + Σ rows·dim update in ``matrix``'s column order → (dense P-vector, tables' Σ rows·dim)."""
        dense, rows, offset = [], [update[:0]] * len(self.sizes), 0
        for kind, a, b in self.layout:
            width = self.sizes[a] if kind == "table" else self.starts[b] - self.starts[a]
            piece = update[offset : offset + width]
            offset += width
            if kind == "table":
                rows[a] = piece
            else:
                dense.append(piece)
        return _joined(dense), _joined(rows)

    def sparse_grads(self, update: torch.Tensor) -> list[torch.Tensor]:
        """A Σ rows·dim update (the tables' columns) as each table's coalesced sparse gradient."""
        out = []
        for ids, module, piece in zip(self.index, self.modules, update.split(self.sizes)):
            out.append(
                torch.sparse_coo_tensor(
                    ids.unsqueeze(0),
                    piece.view(-1, module.embedding_dim),
                    module.weight.shape,
                    is_coalesced=True,
                    check_invariants=False,
                )
            )
        return out


def _unique(looked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(looked, return_inverse=True)``: the sorted unique ids and each lookup's
    position among them. On the CPU through numpy, which gives the same two tensors about twice
    as fast (torch's CPU unique sorts more slowly: 1.3 against 0.6 ms for a batch's 10k lookups)."""
    if looked.device.type != "cpu" or looked.dtype != torch.long:
        return torch.unique(looked, return_inverse=True)
    ids, inverse = np.unique(looked.numpy(), return_inverse=True)
    return torch.from_numpy(ids), torch.from_numpy(inverse.reshape(looked.shape).astype(np.int64, copy=False))


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _layout(model: nn.Module, split: ParamSplit) -> list[tuple[str, int, int]]:
    """The model's parameter order as runs: ("dense", first, last + 1) of ``split.shared`` indices
    (the dense buffer's columns, when kind is dense: its parameters' index range), ("table", t, t)."""
    order = {id(p): i for i, p in enumerate(model.parameters())}
    items = sorted(
        [(order[id(p)], "dense", i) for i, p in enumerate(split.shared)]
        + [(order[id(p)], "table", t) for t, p in enumerate(split.tables)]
    )
    runs: list[tuple[str, int, int]] = []
    for _, kind, i in items:
        if kind == "dense" and runs and runs[-1][0] == "dense" and runs[-1][2] == i:
            runs[-1] = ("dense", runs[-1][1], i + 1)
        else:
            runs.append((kind, i, i + 1) if kind == "dense" else (kind, i, i))
    return runs


def check_mode(mode: str, method) -> None:
    """What a row-sparse mode cannot do with ``method``, refused before anything is written (exit 2).
    torchrun and ``--measure-every`` are fine: the processes exchange their touched rows
    (``distributed.StepReducer.rows``) and measurement is row-sparse too (``transference.rowsparse``)."""
    if mode not in ("coordinate", "sum"):
        return
    if getattr(method, "requires_hvp", False):
        raise UsageError(
            f"--embeddings {mode}: the method needs Hessian-vector products, which the row-sparse "
            "tables do not provide; use --embeddings dense, or another hessian option"
        )
    if mode == "coordinate" and getattr(method, "column_state", False):
        raise UsageError(
            "--embeddings coordinate: the method keeps state per gradient column (cograd "
            "hessian=fisher-ema), but the tables' columns change with the rows each batch touches; "
            "use --embeddings sum or dense, or another hessian option"
        )


def describe(mode: str, model: nn.Module, split: ParamSplit) -> str:
    """For the run's start: the mode and the tables it applies to (before ``separate``)."""
    tables = embedding_tables(model, split)
    rows = sum(m.num_embeddings for _, m in tables)
    numbers = sum(m.weight.numel() for _, m in tables)
    what = {
        "coordinate": "row-sparse, coordinated by the method, lazy optimizer on the touched rows",
        "sum": "row-sparse, the sum of the task gradients, lazy optimizer on the touched rows",
        "freeze": "frozen",
        "dense": "dense, every row a column of the gradient matrix",
    }[mode]
    return f"embedding tables ({rows:,} rows, {numbers:,} numbers): --embeddings {mode} ({what})"
