"""``cogradctl evaluate``: per-task metrics of a checkpoint on labelled data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cogradctl.cli.core import command
from cogradctl.cli.options import (
    Device,
    Json,
    MissingLabels,
    OnInvalid,
    PluginPath,
    Quiet,
    WeightColumn,
    label_options,
    open_data,
    paths,
    report_data,
)
from cogradctl.cli.output import emit_json, fmt, stdout
from cogradctl.console import Log
from cogradctl.errors import UsageError

# The help text is one paragraph, too long for one line of code, hence here rather than a docstring.
HELP = (
    "Per-task AUC (exact, tie-aware) with its standard error (DeLong) and logloss for binary tasks; "
    "MSE and MAE for regression tasks. Each task is scored on its observed rows (null labels masked) "
    "and, with --weight-column, weighted."
)


@command("evaluate", help=HELP)
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to evaluate.")],
    data: Annotated[str, typer.Option(help="Parquet file, directory or glob with the label columns.")],
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = 8192,
    on_invalid_rows: OnInvalid = "error",
    missing_labels: MissingLabels = "mask",
    weight_column: WeightColumn = None,
    device: Device = "auto",
    plugin_path: PluginPath = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    from cogradctl.evaluate import evaluate
    from cogradctl.models import from_checkpoint, resolve_device

    if batch_size < 1:
        raise UsageError("--batch-size must be positive")
    labels = label_options(missing_labels, weight_column)
    dev = resolve_device(device)
    ckpt, model, _ = from_checkpoint(checkpoint, paths(plugin_path), dev)
    log = Log(quiet)
    stream = open_data(data, ckpt.schema, log, on_invalid_rows, labels=labels)
    # streamed in order, never materialised; a bar on stderr when it is a terminal (not --quiet)
    with log.progress(f"evaluate {Path(checkpoint).name}", len(stream)) as advance:
        result = evaluate(model, stream, ckpt.schema, batch_size, dev, standard_errors=True, progress=advance)
    report_data(stream, log)
    if stream.stats["labels_masked"]:  # per task: null labels left out (the key only when there are some)
        result["labels_masked"] = dict(stream.stats["labels_masked"])
    if json_out:
        emit_json(result)
        return
    stdout.print(_table(f"{checkpoint} on {result['rows']} rows", result, {t.type for t in ckpt.schema.tasks}))


# The columns of each task type: (metric key, heading).
COLUMNS = {
    "binary": (("auc", "auc"), ("auc_se", "± se"), ("logloss", "logloss")),
    "regression": (("mse", "mse"), ("mae", "mae")),
}


def _table(title: str, result: dict, types: set[str]) -> Table:
    """One row per task, with the columns of the task types present only (no empty mse/mae columns
    when every task is binary, no AUC columns when every task is a regression)."""
    columns = [c for kind in ("binary", "regression") if kind in types for c in COLUMNS[kind]]
    if any(m.get("rows") != result["rows"] or "weight" in m for m in result["tasks"].values()):
        columns.insert(0, ("rows", "rows scored"))  # partial labels: each task's observed rows
        if any("weight" in m for m in result["tasks"].values()):
            columns.insert(1, ("weight", "weight"))
    table = Table(title=title)
    table.add_column("task")
    for _, heading in columns:
        table.add_column(heading, justify="right")
    for task, m in result["tasks"].items():
        table.add_row(task, *(_cell(m, k) for k, _ in columns))
    return table


def _cell(m: dict, key: str) -> str:
    if key not in m:
        return ""
    if key == "rows":
        return str(m[key])
    if key == "weight":
        return f"{m[key]:g}"
    return fmt(m[key], 5 if key == "auc_se" else 4)
