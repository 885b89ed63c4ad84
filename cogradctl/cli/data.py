"""``cogradctl sample-data`` and ``cogradctl data prepare …``: data sets to try the tool on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cogradctl.cli.core import DEBUG, EXIT_CODES, app, command, command_group, error_exit
from cogradctl.cli.options import Json, Seed, count
from cogradctl.cli.output import emit_json, stdout
from cogradctl.errors import CogradError, UsageError

SAMPLE_TASKS = "click=1:0.3,like=0.8:0.2,share=-0.5:0.1"


@command("sample-data")
def sample_data_cmd(
    out: Annotated[Path, typer.Option(help="Directory to write train.parquet and valid.parquet into.")],
    rows: Annotated[int, typer.Option(help="Training rows.")] = 20_000,
    valid_rows: Annotated[int, typer.Option(help="Validation rows.")] = 5_000,
    tasks: Annotated[
        str | None,
        typer.Option(
            help=f"NAME=RELATEDNESS[:POSITIVE_RATE],… ; the first task is the anchor (--kind mtl; default {SAMPLE_TASKS}).",
            show_default=False,
        ),
    ] = None,
    kind: Annotated[
        str,
        typer.Option(
            help="mtl: the --tasks, every label observed; ctr-cvr: tasks click and purchase, purchase null "
            "where click = 0 (a partial label), and a 'weight' column of row weights."
        ),
    ] = "mtl",
    seed: Seed = 0,
    json_out: Json = False,
) -> None:
    """Generate a synthetic multi-task dataset of known task relatedness (sample_data/)."""
    from cogradctl import sample

    count("--seed", seed, 0)  # a seed must be a non-negative 64-bit integer (torch and numpy take no other)
    if rows < 1 or valid_rows < 1:
        raise UsageError("--rows and --valid-rows must be positive")
    if kind not in sample.KINDS:
        raise UsageError(f"--kind {kind!r}: expected one of {', '.join(sample.KINDS)}")
    if tasks is not None and kind != "mtl":
        raise UsageError(f"--tasks applies to --kind mtl; --kind {kind} has its own tasks")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    try:
        written = sample.write_splits(out, rows, valid_rows, sample.parse_tasks(tasks or SAMPLE_TASKS), seed, kind)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if json_out:
        emit_json(written)
    else:
        for w in written.values():
            stdout.print(f"{w['path']}  rows={w['rows']}")


data_app = command_group("Public data sets: convert raw files to Parquet.")
prepare_app = command_group("Convert a public data set's raw files to Parquet train/valid/test.")
data_app.add_typer(prepare_app, name="prepare")
app.add_typer(data_app, name="data")


@prepare_app.command("census-kdd", epilog=EXIT_CODES)
def census_kdd_cmd(
    source: Annotated[Path, typer.Option(help="Directory with census-income.data.gz and census-income.test.gz (UCI).")],
    out: Annotated[Path, typer.Option(help="Directory to write train/valid/test.parquet and census.json into.")],
    group: Annotated[
        str, typer.Option(help="Task group: 1 = income,marital; 2 = education,marital; all = the three.")
    ] = "1",
    drop_leaky: Annotated[
        bool,
        typer.Option("--drop-leaky", help="Also drop the two household-relationship columns that encode marriage."),
    ] = False,
    seed: Annotated[
        int, typer.Option(help="Seed of the split of the UCI test file into valid and test halves.")
    ] = 2018,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs in --out.")] = False,
    json_out: Json = False,
) -> None:
    """UCI Census-Income (KDD) in the MMoE paper's setup: labels, typed features, valid/test halves."""
    from cogradctl import census

    # Only CogradErrors are turned into one line here (no rank prefix, no KeyboardInterrupt or
    # unexpected-error handling), as before the split of the CLI into modules.
    try:
        summary = census.prepare(source, out, group, drop_leaky, seed, overwrite)
    except CogradError as exc:
        if DEBUG["on"]:
            raise
        raise error_exit(exc) from None
    if json_out:
        emit_json(summary)
        return
    for s in summary["splits"].values():
        rates = "  ".join(f"{k}={v:.4f}" for k, v in s["positive_rate"].items())
        stdout.print(f"{s['path']}  rows={s['rows']}  positive rate: {rates}")
