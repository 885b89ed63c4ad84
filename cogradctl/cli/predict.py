"""``cogradctl predict``: per-row predictions of a checkpoint's model, written to Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cogradctl.cli.core import command
from cogradctl.cli.options import Device, Json, OnInvalid, PluginPath, Quiet, csv_list, paths, report_data
from cogradctl.cli.output import emit_json, stdout
from cogradctl.console import Log

# The help text is one paragraph, too long for one line of code, hence here rather than a docstring.
HELP = (
    "Per-row predictions to Parquet: one row per input row, in the input's order (files sorted, rows "
    "in file order), the --keep-columns copied through unchanged, then one float64 column per task "
    "named after the task: the probability sigmoid(logit) for a binary task, the raw output for a "
    "regression task. Only the feature columns are read (labels are not needed; --on-invalid-rows applies "
    "to NaN/infinite feature values, and dropped rows are counted); memory stays bounded. The output is "
    "written atomically (nothing is left at --out on an error)."
)
SHORT = "Per-row predictions to Parquet (probabilities for binary tasks, values for regression), in input order."


@command("predict", help=HELP, short_help=SHORT)
def predict_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint whose model predicts.")],
    data: Annotated[str, typer.Option(help="Parquet file, directory or glob with the feature columns.")],
    out: Annotated[Path, typer.Option(help="Parquet file to write (never one of the --data files).")],
    keep_columns: Annotated[
        str,
        typer.Option(help="Comma-separated input columns copied to the output unchanged, e.g. id,user_id."),
    ] = "",
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass (does not change the output).")] = 8192,
    on_invalid_rows: OnInvalid = "error",
    device: Device = "auto",
    plugin_path: PluginPath = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    from cogradctl.models import from_checkpoint, resolve_device
    from cogradctl.predict import predict
    from cogradctl.stream import ParquetStream

    dev = resolve_device(device)
    ckpt, model, _ = from_checkpoint(checkpoint, paths(plugin_path), dev)
    log = Log(quiet)
    stream = ParquetStream(data, ckpt.schema, on_invalid=on_invalid_rows, labels=False)
    tasks = ", ".join(ckpt.schema.task_names)
    log.info(f"predicting {tasks} with {ckpt.model} on {stream.num_rows} rows; device {dev}")
    summary = predict(model, stream, ckpt.schema, out, csv_list(keep_columns), batch_size, dev, overwrite)
    report_data(stream, log)
    for task, s in summary["tasks"].items():
        if s["nonfinite"]:
            log.warn(f"task {task}: {s['nonfinite']} prediction(s) are NaN or infinite (written as they are)")
    summary = {"checkpoint": str(checkpoint), "data": data, "device": str(dev), **summary}
    if json_out:
        emit_json(summary)
        return
    stdout.print(
        f"{summary['out']}  rows={summary['rows_written']}  dropped={summary['rows_dropped']}  "
        f"columns={','.join(summary['columns'])}  {summary['seconds']:.2f}s",
        markup=False,
    )
    table = Table()
    for col in ("task", "output", "mean", "min", "max"):
        table.add_column(col, justify="left" if col in ("task", "output") else "right")
    for task, s in summary["tasks"].items():
        table.add_row(task, s["output"], *(_num(s[k]) for k in ("mean", "min", "max")))
    stdout.print(table)


def _num(value: float | None) -> str:
    """Four significant digits: probabilities near 0 and regression values of any scale stay readable."""
    return "n/a" if value is None else f"{value:.4g}"
