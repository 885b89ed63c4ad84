"""``cogradctl train``: fine-tune a checkpoint with a gradient method."""

from __future__ import annotations

import json
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
    Seed,
    WeightColumn,
    csv_list,
    paths,
)
from cogradctl.cli.output import emit_json, fmt, stdout
from cogradctl.console import Log, stderr
from cogradctl.errors import Stopped, UsageError
from cogradctl.train.report import counted


@command("train")
def train_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint to fine-tune (from 'init' or an earlier 'train').  [required, here or in --config]",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Training Parquet: a file, directory or glob.  [required, here or in --config]", show_default=False
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Output directory: last.safetensors, best.safetensors, metrics.jsonl, config.toml.  "
            "[required, here or in --config]",
            show_default=False,
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="Gradient method (see 'cogradctl methods').")] = "ew",
    valid: Annotated[
        str | None,
        typer.Option(help="Validation Parquet, evaluated before, at each epoch (and --eval-every) and after."),
    ] = None,
    gamma: Annotated[str | None, typer.Option(help="CoGrad strength: one number or TASK=V,… per task.")] = None,
    weights: Annotated[str | None, typer.Option(help="Task weights TASK=W,… (methods that take them).")] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Other method option KEY=VALUE, repeatable.")
    ] = None,
    optimizer: Annotated[str, typer.Option(help="adam, adamw or sgd.")] = "adam",
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (decoupled for adamw).")] = 0.0,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    grad_clip: Annotated[
        float | None, typer.Option(help="Clip the global norm of the final gradients to this.")
    ] = None,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warmup over this many steps.")] = 0,
    schedule: Annotated[
        str, typer.Option(help="After warmup: constant, cosine or linear decay to 0 at the last step.")
    ] = "constant",
    batch_size: Annotated[
        int,
        typer.Option(
            help="Rows per step and process (under torchrun the global batch is this × the number of processes)."
        ),
    ] = 1024,
    data_shards: Annotated[
        int | None,
        typer.Option(
            help="Cut each epoch's data into this many shards (default: one per process); "
            "a run resumes with any number of processes that divides it.",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 1,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps (overrides --epochs when smaller).")
    ] = None,
    eval_every: Annotated[int | None, typer.Option(help="Also evaluate on --valid every N steps.")] = None,
    early_stopping: Annotated[
        int | None, typer.Option(help="Stop after N evaluations without a better validation score.")
    ] = None,
    save_every: Annotated[
        int | None, typer.Option(help="Save the resumable state every N steps (it is also saved at each epoch end).")
    ] = None,
    precision: Annotated[
        str, typer.Option(help="fp32, bf16 (autocast, CPU or CUDA) or fp16 (CUDA, dynamic loss scaling).")
    ] = "fp32",
    on_nonfinite: Annotated[
        str, typer.Option(help="abort (exit 4, keep the last saved state) or skip the batch.")
    ] = "abort",
    on_invalid_rows: OnInvalid = "error",
    missing_labels: MissingLabels = "mask",
    weight_column: WeightColumn = None,
    shuffle_buffer: Annotated[
        int, typer.Option(help="Rows held in the shuffle buffer (files and row groups are also shuffled each epoch).")
    ] = 65536,
    log_every: Annotated[int, typer.Option(help="Write a metrics.jsonl record every N steps.")] = 10,
    measure_every: Annotated[
        int | None,
        typer.Option(help="Every N steps, write a transference record (4 fixed training batches) to metrics.jsonl."),
    ] = None,
    embeddings: Annotated[
        str,
        typer.Option(
            help="Shared embedding tables: coordinate (row-sparse: the method sees the rows the batch "
            "touched; lazy Adam on them), sum (row-sparse: the plain sum of the task gradients; the "
            "method coordinates the other shared layers), freeze, dense (every row a gradient column), "
            "or auto: coordinate from 2^24 table numbers on, else dense.",
        ),
    ] = "auto",
    tensorboard: Annotated[
        bool, typer.Option(help="Also log to OUT/tensorboard (needs the tensorboard package).")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="Require an unfinished run in --out and continue it (rerunning the same command does so too)."
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Discard the outputs of an earlier run in --out.")] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A TOML file of these options (keys with underscores); flags override it."),
    ] = None,
    device: Device = "auto",
    seed: Seed = 0,
    plugin_path: PluginPath = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a checkpoint with a gradient method; print per-task AUC/logloss before → after.

    Killed or stopped (SIGTERM/SIGINT: the step finishes, the state is saved, exit 143/130), the
    same command resumes exactly where the run stopped.
    """
    from cogradctl import runconfig
    from cogradctl.distributed import env_rank
    from cogradctl.models import check_checkpoint, resolve_device
    from cogradctl.train import TrainConfig, train

    from_file = runconfig.read(config) if config is not None else {}
    values = _merge(ctx, from_file, runconfig.TYPES)
    dev = resolve_device(str(values["device"]))
    # Task names from the metadata alone: train reads the tensors once, itself.
    # The metadata validated and the model checked on the meta device against the stored shapes.
    tasks = check_checkpoint(values["checkpoint"], paths(plugin_path)).schema.task_names
    method_options = {
        k: (_per_task_table(k, v, tasks) if isinstance(v, dict) else v)
        for k, v in from_file.get("method_options", {}).items()
    }
    method_options.update(_method_options(values["method"], gamma, weights, option or [], tasks))
    cfg = TrainConfig(
        **{
            **values,
            "checkpoint": str(values["checkpoint"]),
            "out": str(values["out"]),
            "device": str(dev),
            "method_options": method_options,
            "overwrite": overwrite,
            "resume": resume,
        }
    )
    # Every option checked before anything is written: the numbers, and the method built once
    # for these tasks (a per-task option of the wrong length, a NaN γ), as the run will build it.
    cfg.check()
    _check_method(cfg, tasks, paths(plugin_path))
    main = env_rank() == 0  # under torchrun, rank 0 alone logs and prints
    try:
        result = train(cfg, Log(quiet or not main), paths(plugin_path))
    except Stopped as exc:
        # Not an error: the run did what SIGINT/SIGTERM ask (the step finished, the state saved); one
        # line saying so, and the exit code of the table (130/143). Printed even with --quiet.
        if main:
            stderr.print(str(exc), markup=False)
        raise typer.Exit(exc.exit_code) from None
    if not main:
        return
    if json_out:
        emit_json(result)
        return
    _print_result(result)


def _check_method(cfg, tasks: list[str], plugin_paths: list[str]) -> None:
    """Build the method with its options and set it up for the checkpoint's tasks; a bad option
    is a UsageError here, before --out exists."""
    from cogradctl.methods import get_method

    method = get_method(cfg.method, plugin_paths, **cfg.method_options)
    try:
        method.setup(len(tasks))
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"method '{cfg.method}': {exc}") from exc


def _merge(ctx: typer.Context, from_file: dict, keys) -> dict:
    """The training options: each flag given on the command line, else the --config file's value,
    else the flag's default; checkpoint, data and out are required from one or the other."""
    given = {name: value for name, value in ctx.params.items()}
    values = {}
    for key in keys:
        if key == "method_options":
            continue
        source = ctx.get_parameter_source(key)  # by name: typer may bring its own click
        explicit = key in given and source is not None and source.name != "DEFAULT"
        values[key] = given[key] if explicit or key not in from_file else from_file[key]
    for key in ("checkpoint", "data", "out"):
        if values[key] is None:
            raise UsageError(f"missing --{key} (give the option, or '{key}' in a --config file)")
    return values


def _method_options(method: str, gamma: str | None, weights: str | None, options: list[str], tasks: list[str]) -> dict:
    """Method options from the CLI: values as JSON, per-task values as TASK=V,… in task order."""
    from cogradctl.models import parse_config

    parsed = parse_config(options)
    for key, value in (("gamma", gamma), ("weights", weights)):
        if value is not None:
            parsed[key] = value
    for key, value in list(parsed.items()):
        if isinstance(value, str) and "=" in value:
            parsed[key] = _per_task(key, value, tasks)
        elif isinstance(value, str):
            try:
                parsed[key] = json.loads(value)
            except json.JSONDecodeError:
                pass
    return parsed


def _per_task(key: str, value: str, tasks: list[str]) -> list[float]:
    given = {}
    for item in csv_list(value):
        name, _, number = item.partition("=")
        if name not in tasks:
            raise UsageError(f"--{key} {value}: unknown task '{name}'; tasks: {', '.join(tasks)}")
        try:
            given[name] = float(number)
        except ValueError:
            raise UsageError(f"--{key} {value}: '{number}' is not a number") from None
    missing = [t for t in tasks if t not in given]
    if missing:
        raise UsageError(f"--{key} {value}: no value for task(s) {', '.join(missing)}")
    return [given[t] for t in tasks]


def _per_task_table(key: str, table: dict, tasks: list[str]) -> list[float]:
    return _per_task(key, ",".join(f"{k}={v}" for k, v in table.items()), tasks)


def _print_result(result: dict) -> None:
    extra = f", {counted(result['skipped'], 'step')} skipped" if result["skipped"] else ""
    extra += ", stopped early" if result["stopped_early"] else ""
    stdout.print(
        f"{result['method']}: {counted(result['steps'], 'step')}, {counted(result['epochs'], 'epoch')}, "
        f"{_time(result)}{extra} → {result['out']}"
    )
    if result["before"] is None:
        return
    stdout.print(_before_after_table(result))
    for line in _best_lines(result):
        stdout.print(line)


def _time(result: dict) -> str:
    """The training time; after a resume, of every session and of this one."""
    if result["sessions"] <= 1:
        return f"{result['seconds']:.1f}s"
    return (
        f"{result['seconds']:.1f}s of training in {result['sessions']} sessions (this one, resumed at step "
        f"{result['resumed_at_step']}: {result['seconds_session']:.1f}s)"
    )


def _before_after_table(result: dict) -> Table:
    """Per task and metric: before (step 0), after (the last step: last.safetensors) and the
    change, and best.safetensors' values when it is from another step; under each AUC its
    standard error (DeLong)."""
    before, after, best = result["before"], result["after"], result["best"]
    last_step, best_step = result["after_step"], best["step"]
    best_eval = best.get("valid") if best_step != last_step else None
    table = Table(title="validation: before → after", caption=_caption(result, best_eval is not None))
    columns = ["task", "metric", "before\nstep 0"]
    if best_eval is None:
        same = " = best" if best_step == last_step and best["score"] is not None else ""
        columns += [f"after\nstep {last_step}\n(last{same})", "change"]
    else:
        columns += [f"last\nstep {last_step}", "change", f"best\nstep {best_step}", "change"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    evaluations = (after, best_eval) if best_eval is not None else (after,)
    for task, metrics in before["tasks"].items():
        for name, value in metrics.items():
            if name in ("auc_se", "rows", "weight"):  # not scores (the rows each task was scored on)
                continue
            row = [task, name, fmt(value)]
            for evaluation in evaluations:
                new = evaluation["tasks"][task].get(name)
                row += [fmt(new), _change(name, value, new)]
            table.add_row(*row)
            if name == "auc" and "auc_se" in metrics:
                row = ["", "± se", fmt(metrics["auc_se"])]
                for evaluation in evaluations:
                    row += [fmt(evaluation["tasks"][task].get("auc_se")), ""]
                table.add_row(*row)
    return table


def _change(name: str, old, new) -> str:
    change = None if old is None or new is None else new - old
    better = change is not None and ((change > 0) == (name == "auc")) and change != 0
    style = "" if change is None or change == 0 else ("green" if better else "red")
    return f"[{style}]{change:+.4f}[/]" if style else fmt(change)


def _caption(result: dict, both: bool) -> str:
    after = (
        "last: the final weights (last.safetensors); best: best.safetensors"
        if both
        else "after: the final weights (last.safetensors)"
    )
    rows = result.get("data", {}) or {}
    valid = rows.get("valid")
    on = f" on {counted(valid['rows_used'], 'row')} of --valid" if valid else ""
    weighted = any("weight" in m for m in (result.get("after") or {}).get("tasks", {}).values())
    return f"{after}; ± se: the AUC's standard error (DeLong){on}" + (", n/a with row weights" if weighted else "")


def _best_lines(result: dict) -> list[str]:
    """Which weights best.safetensors holds and what its score averages; and, when every task's
    AUC fell, that plainly."""
    best, after = result["best"], result["after"]
    path = Path(result["out"]) / "best.safetensors"
    averaged, without = best.get("averaged", []), best.get("without_auc", [])
    lines = []
    if best["score"] is None:
        lines.append(
            "no validation score: no task has an AUC on --valid (one class only)"
            + (f" ({', '.join(without)})" if without else "")
            + "; best.safetensors was not written"
        )
        return lines
    if without and not averaged:
        label = f"score (-mean MSE; {', '.join(without)} {'has' if len(without) == 1 else 'have'} no AUC on --valid)"
    else:
        label = "mean AUC" if best["auc"] is not None else "score (-mean MSE)"
    where = "the starting point (no evaluation beat it)" if best["step"] == 0 else f"step {best['step']}"
    note = ""
    if best["auc"] is not None and without:
        note = (
            f" (the mean of {', '.join(averaged)}: {', '.join(without)} "
            f"{'has' if len(without) == 1 else 'have'} no AUC on --valid)"
        )
    lines.append(f"best {label} {fmt(best['score'])} at {where} → {path}{note}")
    changes = [
        after["tasks"][t]["auc"] - m["auc"]
        for t, m in result["before"]["tasks"].items()
        if m.get("auc") is not None and after["tasks"][t].get("auc") is not None
    ]
    if changes and all(c < 0 for c in changes):
        lines.append(
            f"every task's AUC fell from step 0 to the last step ({result['after_step']}): "
            f"best.safetensors is from step {best['step']}"
            + (" (the starting point)" if best["step"] == 0 else "")
            + ", last.safetensors from the last step"
        )
    return lines
