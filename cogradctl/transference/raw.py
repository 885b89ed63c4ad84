"""The raw per-batch table (``--raw``): one row per checkpoint role, module, batch, source and
target, written as zstd-compressed Parquet.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from cogradctl.transference.lookahead import MATRICES


def raw_table(tasks: list[str], runs: list[tuple[str, list[dict], list[dict]]]):
    """A pyarrow table, one row per (checkpoint role, module, batch, source, target) — every ordered
    pair including the diagonal (a task's own progress), so K×K rows per batch and module; a value
    is null where the batch gives none (its source or target task had no observed row there)."""
    import pyarrow as pa

    cols: dict[str, list] = {
        k: []
        for k in (
            "checkpoint",
            "module",
            "batch",
            "step_rows_start",
            "step_rows_end",
            "eval_rows_start",
            "eval_rows_end",
            "source",
            "target",
            "loss_before",
            "loss_after",
            *MATRICES[:2],
            "cosine",
            "conflict",
            "gms",
            "grad_norm_source",
            "grad_norm_target",
        )
    }
    k = len(tasks)
    for role, per_batch, measured in runs:
        modules = [None] + sorted(per_batch[0].get("modules", {})) if per_batch else [None]
        for module in modules:
            for b, (res, where) in enumerate(zip(per_batch, measured)):
                r = res["modules"][module] if module else res
                ev = where.get("evaluated_on", where)["rows"]
                for i in range(k):
                    for j in range(k):
                        cols["checkpoint"].append(role)
                        cols["module"].append(module or "*")
                        cols["batch"].append(b)
                        cols["step_rows_start"].append(where["rows"][0])
                        cols["step_rows_end"].append(where["rows"][1])
                        cols["eval_rows_start"].append(ev[0])
                        cols["eval_rows_end"].append(ev[1])
                        cols["source"].append(tasks[i])
                        cols["target"].append(tasks[j])
                        cols["loss_before"].append(_value(r["loss_before"][j]))
                        cols["loss_after"].append(_value(r["loss_after"][i, j]))
                        cols["transference"].append(_value(r["transference"][i, j]))
                        cols["transference_rel"].append(_value(r["transference_rel"][i, j]))
                        cols["cosine"].append(_value(r["cosine"][i, j]))
                        cols["conflict"].append(_flag(r["conflict_rate"][i, j]))
                        cols["gms"].append(_value(r["gms"][i, j]))
                        cols["grad_norm_source"].append(_value(r["grad_norm"][i]))
                        cols["grad_norm_target"].append(_value(r["grad_norm"][j]))
    return pa.table(cols)


def _value(v) -> float | None:
    """A float, or None (a null) where the batch gives the entry no value (a task not observed there)."""
    v = float(v)
    return None if math.isnan(v) else v


def _flag(v) -> bool | None:
    return None if math.isnan(float(v)) else bool(v > 0)


def write_raw(table, path) -> None:
    import pyarrow.parquet as pq

    from cogradctl.atomic_files import atomic_write_bytes

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(Path(path), sink.getvalue())
