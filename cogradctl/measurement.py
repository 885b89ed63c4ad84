"""A checkpoint's transference measurement, as ``cogradctl measure-transference`` runs it.

The lookahead step (plain SGD, or Adam's next step from the optimizer state saved in the
checkpoint), the measurement over the stream (``transference.measure_full``), and a baseline
measured on the same batches, put in the checkpoint's task order and compared with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cogradctl import tables
from cogradctl import transference as tr
from cogradctl.distributed import SINGLE, Dist
from cogradctl.errors import UsageError

EMBEDDINGS = ("auto", "coordinate", "dense")  # measure-transference --embeddings


@dataclass(frozen=True)
class Options:
    """How to measure: the options of ``measure-transference`` that shape the measurement."""

    batches: int = 10
    batch_size: int = 1024
    lookahead: str = "sgd"  # sgd or optimizer
    lookahead_lr: float | None = None  # None: DEFAULT_LOOKAHEAD_LR for sgd, the trained lr for optimizer
    seed: int = 0
    holdout: bool = False
    by_module: bool = False
    normalize_rows: bool = False
    embeddings: str = "auto"  # shared embedding tables: auto (train's size rule), coordinate (row-sparse), dense


def take_tables(model, split, options: Options) -> str | None:
    """How the measurement takes the model's shared embedding tables (docs/transference.md): ``auto``
    resolved by train's size rule (``tables.resolve``: row-sparse from 2^24 table numbers on, so a
    model measures the way ``train --embeddings auto`` trains it), ``coordinate`` row-sparse
    (``split.tables``), ``dense`` every row a column. → the mode, None for a model without tables."""
    if options.embeddings not in EMBEDDINGS:
        raise UsageError(f"--embeddings {options.embeddings!r}: expected {', '.join(EMBEDDINGS)}")
    if not tables.embedding_tables(model, split):
        return None
    mode = tables.resolve(options.embeddings, model, split)
    tables.separate(model, split, mode)
    return mode


def lookahead_step(ckpt, split, options: Options, source: str | Path):
    """→ (Adam state or None, lookahead step α, info) for ``ckpt`` (read from ``source``); info (the
    result's ``lookahead_state``, optimizer lookahead only): the saved Adam state's β₂, ε, step
    count, and how many shared entries it never trained (v = 0)."""
    if options.lookahead == "optimizer":
        state, trained_lr, info = tr.adam_preconditioner(ckpt.extra, ckpt.history, split, str(source))
        return state, trained_lr if options.lookahead_lr is None else options.lookahead_lr, info
    return None, tr.DEFAULT_LOOKAHEAD_LR if options.lookahead_lr is None else options.lookahead_lr, None


def measure(
    ckpt, model, split, stream, precond, alpha: float, options: Options, device, dist: Dist = SINGLE, progress=None
):
    """→ (summarised result, per-batch results) of ``model`` on the batches picked from ``stream``;
    ``progress(done, total)``: called before the batches are read and after each is measured."""
    groups = tr.shared_groups(model, split, ckpt.model) if options.by_module else None
    return tr.measure_full(
        model,
        split,
        ckpt.schema,
        stream,
        options.batches,
        options.batch_size,
        alpha,
        options.seed,
        device,
        precond,
        groups,
        options.holdout,
        options.normalize_rows,
        options.lookahead,
        dist,
        progress,
    )


def add_baseline(result: dict, per_batch: list[dict], before: dict, before_pb: list[dict], source, normalize_rows):
    """Attach a baseline measured on the same batches as ``result``: ``result["baseline"]`` (in
    ``result``'s task order) and ``result["delta"]``; → the baseline's per-batch results, in that order."""
    order = [before["tasks"].index(t) for t in result["tasks"]]
    if order != list(range(len(order))):
        before_pb = tr.reorder(before_pb, order)
        before = {**before, **tr.summarise(before_pb, None, normalize_rows), "tasks": result["tasks"]}
        before.pop("modules", None)
    result["baseline"] = {"checkpoint": str(source), **before}
    result["delta"] = tr.compare(per_batch, before_pb)
    return before_pb
