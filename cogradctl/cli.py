"""The command line: parse options, call the library, print. No computation lives here.

stdout carries data only (tables, or exactly one JSON document with ``--json``); logs, warnings and
progress go to stderr. Errors are one line on stderr and an exit code from the table in
``cogradctl.errors`` (a traceback only with ``--debug`` or ``COGRADCTL_DEBUG=1``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cogradctl import __version__
from cogradctl.allocator import keep_freed_memory
from cogradctl.console import Log, stderr
from cogradctl.errors import EXIT_UNEXPECTED, CogradError, UsageError

EXIT_CODES = (
    "Exit codes: 0 success; 1 unexpected failure (a bug; rerun with COGRADCTL_DEBUG=1 for a traceback); "
    "2 usage or input error (bad option, missing or invalid file, schema mismatch); 3 a quality gate failed; "
    "4 training diverged (non-finite loss or gradient); 130/143 stopped by SIGINT/SIGTERM after saving (rerun to resume)."
)

app = typer.Typer(
    name="cogradctl",
    help="Fine-tune multi-task models with CoGrad, GDOD or a baseline, and measure task transference and gradient conflict.",
    epilog=EXIT_CODES,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
stdout = Console(highlight=False, soft_wrap=True)
DEBUG = {"on": os.environ.get("COGRADCTL_DEBUG", "") not in ("", "0")}

# ---------------------------------------------------------------------------- shared options

Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No log lines or progress bars on stderr.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
Seed = Annotated[int, typer.Option(help="Random seed (same seed and data → same results).")]
PluginPath = Annotated[
    Optional[list[Path]],
    typer.Option("--plugin-path", help="Folder of plugin .py files (repeatable; also COGRADCTL_PLUGIN_PATH).", show_default=False),
]
OnInvalid = Annotated[
    str,
    typer.Option("--on-invalid-rows", help="Rows with NaN/infinite features or labels, or null labels: error (exit 2, with a count) or drop (skip them, log the count)."),
]


def _paths(plugin_path: list[Path] | None) -> list[str]:
    return [str(p) for p in plugin_path or []]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def command(name: str, **kwargs):
    """Register a command whose CogradErrors become one line on stderr and their exit code."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except typer.Exit:
                raise
            except CogradError as exc:
                if DEBUG["on"]:
                    raise
                stderr.print(f"{_rank_prefix()}error: {exc}", markup=False, style="red")
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                stderr.print("interrupted", markup=False)
                raise typer.Exit(130) from None
            except Exception as exc:
                if DEBUG["on"]:
                    raise
                stderr.print(f"unexpected error: {type(exc).__name__}: {exc} (rerun with COGRADCTL_DEBUG=1 for a traceback)", markup=False, style="red")
                raise typer.Exit(EXIT_UNEXPECTED) from None

        return app.command(name, epilog=EXIT_CODES, **kwargs)(wrapper)

    return decorate


def _rank_prefix() -> str:
    """Under torchrun, errors from processes other than rank 0 name their rank."""
    from cogradctl.distributed import env_rank

    return f"[rank {env_rank()}] " if env_rank() else ""


def emit_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"cogradctl {__version__}\n")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also COGRADCTL_DEBUG=1).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    if debug:
        DEBUG["on"] = True


# ---------------------------------------------------------------------------- init


@command("init")
def init_cmd(
    model: Annotated[str, typer.Option(help="Model plugin name (see 'cogradctl models').")],
    data: Annotated[str, typer.Option(help="Parquet file, directory or glob to infer the schema from.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated label columns, e.g. click,like,share.")],
    out: Annotated[Path, typer.Option(help="Checkpoint file to write (.safetensors).")],
    config: Annotated[Optional[list[str]], typer.Option("--config", help="Model option KEY=VALUE (JSON values), repeatable.")] = None,
    features: Annotated[Optional[str], typer.Option(help="Comma-separated feature columns (default: every non-task column).")] = None,
    dense: Annotated[str, typer.Option(help="Columns to treat as dense, overriding the inference.")] = "",
    categorical: Annotated[str, typer.Option(help="Columns to treat as categorical, overriding the inference.")] = "",
    task_type: Annotated[Optional[list[str]], typer.Option("--task-type", help="TASK=binary|regression (default binary), repeatable.")] = None,
    max_vocab: Annotated[int, typer.Option(help="Keep at most this many most frequent values per categorical feature.")] = 100_000,
    min_count: Annotated[int, typer.Option(help="Drop categorical values seen fewer times (they map to the OOV bucket).")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    seed: Seed = 0,
    plugin_path: PluginPath = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Create a checkpoint with fresh weights: infer the schema from Parquet and build the model."""
    import torch

    from cogradctl import checkpoint as ckpt_io
    from cogradctl import data as data_io
    from cogradctl import models, schema as schema_mod
    from cogradctl.train import now

    log = Log(quiet)
    task_list = _csv(tasks)
    if not task_list:
        raise UsageError("--tasks: give at least one label column")
    if len(set(task_list)) != len(task_list):
        raise UsageError(f"--tasks {tasks}: a task is named twice")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give the checkpoint file to write, e.g. {out / 'init.safetensors'}")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out}: file exists; pass --overwrite to replace it")
    if max_vocab < 1 or min_count < 1:
        raise UsageError("--max-vocab and --min-count must be at least 1")
    types = schema_mod.parse_task_types(task_type or [], task_list)
    model_config = models.parse_config(config or [])
    schema, rows = data_io.infer_schema(
        data, task_list, types, _csv(features) if features else None, _csv(dense), _csv(categorical), max_vocab, min_count
    )
    torch.manual_seed(seed)
    net, effective = models.build(model, schema, model_config, _paths(plugin_path))
    split = models.split_parameters(net, schema.task_names, model)
    history = [{"run": "init", "data": data, "rows": rows, "seed": seed, "time": now()}]
    ckpt_io.save(ckpt_io.Checkpoint(model, effective, schema, net.state_dict(), history), out)
    log.info(f"wrote {out}: {model} with {split.num_shared} shared parameters, {len(schema.features)} features, tasks {', '.join(task_list)}")
    summary = {
        "checkpoint": str(out),
        "model": model,
        "config": effective,
        "rows": rows,
        "tasks": {t.name: t.type for t in schema.tasks},
        "features": {f.name: f.kind for f in schema.features},
        "parameters": _param_counts(net, split),
    }
    if json_out:
        emit_json(summary)
    else:
        stdout.print(f"{out}  model={model}  rows={rows}  features={len(schema.features)}  tasks={','.join(task_list)}  shared_params={split.num_shared}")


def _param_counts(net, split) -> dict:
    return {
        "shared": split.num_shared,
        "tasks": {t: sum(p.numel() for p in ps) for t, ps in split.tasks.items()},
        "total": sum(p.numel() for p in net.parameters()),
    }


# ---------------------------------------------------------------------------- train


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
    for item in _csv(value):
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


@command("train")
def train_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint to fine-tune (from 'init' or an earlier 'train').", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option(help="Training Parquet: a file, directory or glob.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory: last.safetensors, best.safetensors, metrics.jsonl, config.toml.", show_default=False)] = None,
    method: Annotated[str, typer.Option(help="Gradient method (see 'cogradctl methods').")] = "ew",
    valid: Annotated[Optional[str], typer.Option(help="Validation Parquet, evaluated before, at each epoch (and --eval-every) and after.")] = None,
    gamma: Annotated[Optional[str], typer.Option(help="CoGrad strength: one number or TASK=V,… per task.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Task weights TASK=W,… (methods that take them).")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Other method option KEY=VALUE, repeatable.")] = None,
    optimizer: Annotated[str, typer.Option(help="adam, adamw or sgd.")] = "adam",
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (decoupled for adamw).")] = 0.0,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip the global norm of the final gradients to this.")] = None,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warmup over this many steps.")] = 0,
    schedule: Annotated[str, typer.Option(help="After warmup: constant, cosine or linear decay to 0 at the last step.")] = "constant",
    batch_size: Annotated[int, typer.Option(help="Rows per step and process (under torchrun the global batch is this × the number of processes).")] = 1024,
    data_shards: Annotated[Optional[int], typer.Option(help="Cut each epoch's data into this many shards (default: one per process); a run resumes with any number of processes that divides it.", show_default=False)] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps (overrides --epochs when smaller).")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Also evaluate on --valid every N steps.")] = None,
    early_stopping: Annotated[Optional[int], typer.Option(help="Stop after N evaluations without a better validation score.")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Save the resumable state every N steps (it is also saved at each epoch end).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, bf16 (autocast, CPU or CUDA) or fp16 (CUDA, dynamic loss scaling).")] = "fp32",
    on_nonfinite: Annotated[str, typer.Option(help="abort (exit 4, keep the last saved state) or skip the batch.")] = "abort",
    on_invalid_rows: OnInvalid = "error",
    shuffle_buffer: Annotated[int, typer.Option(help="Rows held in the shuffle buffer (files and row groups are also shuffled each epoch).")] = 65536,
    log_every: Annotated[int, typer.Option(help="Write a metrics.jsonl record every N steps.")] = 10,
    measure_every: Annotated[Optional[int], typer.Option(help="Every N steps, write a transference record (4 fixed training batches) to metrics.jsonl.")] = None,
    tensorboard: Annotated[bool, typer.Option(help="Also log to OUT/tensorboard (needs the tensorboard package).")] = False,
    resume: Annotated[bool, typer.Option(help="Require an unfinished run in --out and continue it (rerunning the same command does so too).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Discard the outputs of an earlier run in --out.")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help="A TOML file of these options (keys with underscores); flags override it.")] = None,
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
    from cogradctl import checkpoint as ckpt_io
    from cogradctl import runconfig
    from cogradctl.models import resolve_device
    from cogradctl.schema import Schema
    from cogradctl.train import TrainConfig, train

    given = {name: value for name, value in ctx.params.items()}
    from_file = runconfig.read(config) if config is not None else {}
    values = {}
    for key in runconfig.TYPES:
        if key == "method_options":
            continue
        source = ctx.get_parameter_source(key)  # by name: typer may bring its own click
        explicit = key in given and source is not None and source.name != "DEFAULT"
        values[key] = given[key] if explicit or key not in from_file else from_file[key]
    for key in ("checkpoint", "data", "out"):
        if values[key] is None:
            raise UsageError(f"missing --{key} (give the option, or '{key}' in a --config file)")
    dev = resolve_device(str(values["device"]))
    # Task names from the metadata alone: train reads the tensors once, itself.
    tasks = Schema.from_json(ckpt_io.read_metadata(values["checkpoint"])["schema"]).task_names
    method_options = {k: (_per_task_table(k, v, tasks) if isinstance(v, dict) else v) for k, v in from_file.get("method_options", {}).items()}
    method_options.update(_method_options(values["method"], gamma, weights, option or [], tasks))
    cfg = TrainConfig(**{**values, "checkpoint": str(values["checkpoint"]), "out": str(values["out"]), "device": str(dev),
                         "method_options": method_options, "overwrite": overwrite, "resume": resume})
    from cogradctl.distributed import env_rank

    main = env_rank() == 0  # under torchrun, rank 0 alone logs and prints
    result = train(cfg, Log(quiet or not main), _paths(plugin_path))
    if not main:
        return
    if json_out:
        emit_json(result)
        return
    extra = f", {result['skipped']} skipped" if result["skipped"] else ""
    extra += ", stopped early" if result["stopped_early"] else ""
    stdout.print(f"{result['method']}: {result['steps']} steps, {result['epochs']} epoch(s), {result['seconds']:.1f}s{extra} → {result['out']}")
    if result["before"] is not None:
        stdout.print(_before_after_table(result["before"], result["after"]))
        label = "mean AUC" if result["best"]["auc"] is not None else "score (-mean MSE)"
        stdout.print(f"best {label} {_fmt(result['best']['score'])} at step {result['best']['step']} → {Path(result['out']) / 'best.safetensors'}")


def _per_task_table(key: str, table: dict, tasks: list[str]) -> list[float]:
    return _per_task(key, ",".join(f"{k}={v}" for k, v in table.items()), tasks)


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _before_after_table(before: dict, after: dict) -> Table:
    table = Table(title="validation: before → after")
    for col in ("task", "metric", "before", "after", "change"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metrics in before["tasks"].items():
        for name, value in metrics.items():
            new = after["tasks"][task][name]
            change = None if value is None or new is None else new - value
            better = change is not None and ((change > 0) == (name == "auc")) and change != 0
            style = "" if change is None or change == 0 else ("green" if better else "red")
            table.add_row(task, name, _fmt(value), _fmt(new), f"[{style}]{change:+.4f}[/]" if style else _fmt(change))
    return table


# ---------------------------------------------------------------------------- evaluate


@command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to evaluate.")],
    data: Annotated[str, typer.Option(help="Parquet file, directory or glob with the label columns.")],
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = 8192,
    on_invalid_rows: OnInvalid = "error",
    device: Device = "auto",
    plugin_path: PluginPath = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Per-task AUC (exact, tie-aware) with its standard error (DeLong) and logloss for binary tasks; MSE and MAE for regression tasks."""
    from cogradctl.evaluate import evaluate
    from cogradctl.models import from_checkpoint, resolve_device

    if batch_size < 1:
        raise UsageError("--batch-size must be positive")
    dev = resolve_device(device)
    ckpt, model, _ = from_checkpoint(checkpoint, _paths(plugin_path), dev)
    log = Log(quiet)
    stream = _open_data(data, ckpt.schema, log, on_invalid_rows)
    result = evaluate(model, stream, ckpt.schema, batch_size, dev, standard_errors=True)  # streamed in order, never materialised
    _report_data(stream, log)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{checkpoint} on {result['rows']} rows")
    for col in ("task", "auc", "± se", "logloss", "mse", "mae"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, m in result["tasks"].items():
        table.add_row(task, *(_fmt(m[k], 5 if k == "auc_se" else 4) if k in m else "" for k in ("auc", "auc_se", "logloss", "mse", "mae")))
    stdout.print(table)


def _open_data(spec: str, schema, log: Log, on_invalid: str = "error", shuffle_buffer: int = 65536):
    """A ParquetStream over ``spec`` (files validated from their footers; nothing read yet)."""
    from cogradctl.stream import ParquetStream

    return ParquetStream(spec, schema, on_invalid=on_invalid, shuffle_buffer=shuffle_buffer)


def _report_data(stream, log: Log) -> None:
    """Log what reading the stream dropped (--on-invalid-rows drop) and mapped to the OOV bucket."""
    dropped = stream.stats.get("rows_dropped", 0)
    if dropped:
        log.warn(f"{stream.spec}: dropped {dropped} invalid row(s) (NaN/infinite values or null labels; --on-invalid-rows drop)")
    unseen = {c: n for c, n in stream.stats.get("oov", {}).items() if n}
    if unseen:
        listed = ", ".join(f"{c}: {n}" for c, n in sorted(unseen.items()))
        log.warn(f"{stream.spec}: categorical values not seen at init were mapped to the OOV bucket ({listed})")


# ---------------------------------------------------------------------------- measure-transference


@command("measure-transference")
def measure_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to measure.")],
    data: Annotated[str, typer.Option(help="Parquet file, directory or glob with the label columns.")],
    batches: Annotated[int, typer.Option(help="Number of batches to average over.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Rows per measured batch.")] = 1024,
    lookahead: Annotated[str, typer.Option(help="sgd: step −α·g_i; optimizer: Adam-preconditioned step −α·g_i/(sqrt(v̂)+ε) from the checkpoint's saved Adam state.")] = "sgd",
    lookahead_lr: Annotated[Optional[float], typer.Option("--lookahead-lr", help="Lookahead step α (default 0.1 for sgd; the training lr saved in the checkpoint for optimizer).")] = None,
    holdout: Annotated[bool, typer.Option("--holdout", help="Step on each batch, measure the losses on the next one (generalising transfer).")] = False,
    by_module: Annotated[bool, typer.Option("--by-module", help="Also break every matrix down by group of shared parameters.")] = False,
    normalize_rows: Annotated[bool, typer.Option("--normalize-rows", help="Also report Z and Z_rel divided by the row's diagonal (the source's own progress).")] = False,
    baseline: Annotated[Optional[Path], typer.Option(help="Checkpoint from before (e.g. before fine-tuning): measure it on the same batches and report the change.")] = None,
    min_transference: Annotated[Optional[float], typer.Option(help="Gate: exit 3 if any off-diagonal Z_rel is below this.")] = None,
    max_conflict_rate: Annotated[Optional[float], typer.Option(help="Gate: exit 3 if any pair's conflict rate is above this.")] = None,
    max_regression: Annotated[Optional[float], typer.Option(help="Gate (needs --baseline): exit 3 if any pair's Z_rel fell by more than this.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write heatmaps to this PNG (needs: pip install \"cogradctl[plot]\").")] = None,
    raw: Annotated[Optional[Path], typer.Option(help="Write every per-batch quantity to this Parquet file (one row per batch × ordered pair).")] = None,
    on_invalid_rows: OnInvalid = "error",
    device: Device = "auto",
    seed: Seed = 0,
    plugin_path: PluginPath = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Pairwise lookahead transference (rows: source task, columns: target) and gradient conflict.

    Gates (--min-transference, --max-conflict-rate, --max-regression) print the results first, then
    exit 3 with a one-line reason naming the pair when one fails.
    """
    from cogradctl import checkpoint as ckpt_io
    from cogradctl import transference as tr
    from cogradctl.models import from_checkpoint, resolve_device

    if batches < 1 or batch_size < 1:
        raise UsageError("--batches and --batch-size must be positive")
    if lookahead not in ("sgd", "optimizer"):
        raise UsageError(f"--lookahead {lookahead!r}: expected sgd or optimizer")
    if lookahead_lr is not None and not lookahead_lr > 0:
        raise UsageError(f"--lookahead-lr must be positive, got {lookahead_lr}")
    if max_regression is not None and baseline is None:
        raise UsageError("--max-regression needs --baseline BEFORE.safetensors")
    if max_conflict_rate is not None and not 0 <= max_conflict_rate <= 1:
        raise UsageError(f"--max-conflict-rate must be in [0, 1], got {max_conflict_rate}")
    if plot is not None:
        _require_matplotlib()
    import torch

    from cogradctl.distributed import env_rank, process_group

    log = Log(quiet or env_rank() != 0)
    # Under torchrun, each process measures its share of the batches (docs/distributed.md).
    with process_group(str(resolve_device(device))) as (dist, device_name):
        dev = torch.device(device_name)
        ckpt, model, split = from_checkpoint(checkpoint, _paths(plugin_path), dev)
        base_ckpt = None
        if baseline is not None:
            base_ckpt = ckpt_io.load(baseline)
            mine, theirs = ckpt.schema.task_names, base_ckpt.schema.task_names
            if set(mine) != set(theirs):
                raise UsageError(f"--baseline {baseline} has tasks {', '.join(theirs)} but --checkpoint {checkpoint} has {', '.join(mine)}; both must have the same tasks")

        def run(ck, net, sp, path):
            precond, alpha = None, lookahead_lr
            if lookahead == "optimizer":
                precond, trained_lr, _ = tr.adam_preconditioner(ck.extra, ck.history, sp, str(path))
                alpha = trained_lr if lookahead_lr is None else lookahead_lr
            elif alpha is None:
                alpha = tr.DEFAULT_LOOKAHEAD_LR
            stream = _open_data(data, ck.schema, log, on_invalid_rows)  # only the picked row ranges are read
            groups = tr.shared_groups(net, sp, ck.model) if by_module else None
            out = tr.measure_full(net, sp, ck.schema, stream, batches, batch_size, alpha, seed, dev, precond, groups, holdout, normalize_rows, lookahead, dist)
            _report_data(stream, log)
            return out

        log.info(f"measuring {checkpoint}")
        result, per_batch = run(ckpt, model, split, checkpoint)
        runs = [("checkpoint", per_batch, result["measured"])]
        if base_ckpt is not None:
            log.info(f"measuring the baseline {baseline} on the same batches")
            _, base_model, base_split = from_checkpoint(baseline, _paths(plugin_path), dev)
            before, before_pb = run(base_ckpt, base_model, base_split, baseline)
            order = [before["tasks"].index(t) for t in result["tasks"]]
            if order != list(range(len(order))):
                before_pb = tr.reorder(before_pb, order)
                before = {**before, **tr.summarise(before_pb, None, normalize_rows), "tasks": result["tasks"]}
                before.pop("modules", None)
            result["baseline"] = {"checkpoint": str(baseline), **before}
            result["delta"] = tr.compare(per_batch, before_pb)
            runs.append(("baseline", before_pb, before["measured"]))
        result["checkpoint"] = str(checkpoint)
        if not dist.main:
            return  # under torchrun, rank 0 alone writes and prints
        if raw is not None:
            tr.write_raw(tr.raw_table(result["tasks"], runs), raw)
            log.info(f"wrote {raw}")
        if plot is not None:
            _plot_heatmaps(result, plot)
            log.info(f"wrote {plot}")
        if json_out:
            emit_json(result)
        else:
            _print_measurement(result)
        tr.gate(result, min_transference=min_transference, max_conflict_rate=max_conflict_rate, max_regression=max_regression)


def _print_measurement(result: dict) -> None:
    tasks, alpha = result["tasks"], result["lookahead_lr"]
    how = f"{result['lookahead']} lookahead, α={alpha:g}, {result['batches']} batches" + (", holdout" if result["holdout"] else "")
    key = "transference_rel_normalized" if "transference_rel_normalized" in result else "transference_rel"
    title = "relative transference Z_rel" + (" ÷ own progress (row diagonal)" if key != "transference_rel" else "")
    if "baseline" in result:
        stdout.print(_matrix_table(f"before: {title} (row → column, {how})", tasks, result["baseline"][key], result["baseline"]["stderr"][key], diverging=True))
    stdout.print(_matrix_table(f"{'after: ' if 'baseline' in result else ''}{title} (row → column, {how})", tasks, result[key], result["stderr"][key], diverging=True))
    if "delta" in result:
        d = result["delta"]
        stdout.print(_matrix_table("change of Z_rel (after − before; ▲ improved / ▼ worsened beyond its standard error)", tasks, d["transference_rel"], d["stderr"]["transference_rel"], diverging=True, marks=d["verdict"]))
    stdout.print(_matrix_table("gradient cosine", tasks, result["cosine"], result["stderr"]["cosine"], diverging=True))
    stdout.print(_matrix_table("conflict rate (share of batches with cosine < 0)", tasks, result["conflict_rate"], None, diverging=False))
    stdout.print(_matrix_table("gradient magnitude similarity", tasks, result["gms"], None, diverging=False))
    for name, m in result.get("modules", {}).items():
        stdout.print(_matrix_table(f"module {name} ({m['size']} parameters): Z_rel of a lookahead that moves only this module", tasks, m["transference_rel"], m["stderr"]["transference_rel"], diverging=True))
        stdout.print(_matrix_table(f"module {name}: gradient cosine (conflict rate in brackets)", tasks, m["cosine"], None, diverging=True, extra=m["conflict_rate"]))
    stdout.print(transference_summary(result))


def _diverging_style(v: float | None, scale: float) -> str:
    """Positive blue, negative red, intensity by |v| / scale (the table's largest off-diagonal |v|)."""
    if v is None or v == 0 or scale <= 0:
        return ""
    t = min(abs(v) / scale, 1.0)
    grey = 150
    if v > 0:
        r, g, b = (round(grey * (1 - t) + c * t) for c in (40, 120, 255))
    else:
        r, g, b = (round(grey * (1 - t) + c * t) for c in (255, 50, 50))
    return f"{'bold ' if t > 0.5 else ''}rgb({r},{g},{b})"


def _matrix_table(title: str, tasks: list[str], values, errors, diverging: bool, marks=None, extra=None) -> Table:
    table = Table(title=title)
    table.add_column("source ↓ / target →")
    for t in tasks:
        table.add_column(t, justify="right")
    k = len(tasks)
    off = [abs(values[i][j]) for i in range(k) for j in range(k) if i != j and values[i][j] is not None]
    scale = max(off, default=0.0)
    # Small effects (|v| < 0.01 everywhere) in scientific notation, so they do not print as +0.0000.
    small = diverging and 0 < max((abs(v) for row in values for v in row if v is not None), default=0.0) < 0.01
    for i, src in enumerate(tasks):
        cells = []
        for j in range(k):
            v = values[i][j]
            if v is None:
                cells.append("n/a")
                continue
            text = (f"{v:+.2e}" if small else f"{v:+.4f}") if diverging else f"{v:.2f}"
            if errors is not None and errors[i][j] is not None:
                text += f" ±{errors[i][j]:.1e}" if small else f" ±{errors[i][j]:.4f}"
            if extra is not None:
                text += f" ({extra[i][j]:.2f})"
            if marks is not None and i != j:
                text += {"improved": " ▲", "worsened": " ▼"}.get(marks[i][j], "  ")
            style = "dim" if i == j else (_diverging_style(v, scale) if diverging else "")
            cells.append(f"[{style}]{text}[/]" if style else text)
        table.add_row(src, *cells)
    return table


def _strength(v: float, e: float, own: float | None) -> str:
    if abs(v) <= 2 * e:
        return "no clear effect"
    strong = "strong " if own and abs(v) >= 0.5 * abs(own) else ("weak " if own and abs(v) < 0.1 * abs(own) else "")
    return f"{strong}{'positive' if v > 0 else 'negative'}"


def transference_summary(result: dict) -> str:
    """One plain-language paragraph: every ordered pair, strongest effect first, with its change
    after fine-tuning when a baseline was measured, then the most conflicting pair."""
    tasks, z, err = result["tasks"], result["transference_rel"], result["stderr"]["transference_rel"]
    k = len(tasks)
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j and z[i][j] is not None]
    delta = result.get("delta")
    parts = []
    for i, j in sorted(pairs, key=lambda p: -abs(z[p[0]][p[1]])):
        text = f"{tasks[i]} → {tasks[j]}: {_strength(z[i][j], err[i][j], z[i][i])}"
        if delta is not None:
            verdict, d = delta["verdict"][i][j], delta["transference_rel"][i][j]
            if verdict != "unchanged":
                text += f", {verdict} by {abs(d):.3g} after fine-tuning"
        parts.append(text)
    if not parts:
        return "transference summary: only one task, nothing to compare."
    head = ("transference summary: a step on the first task of each pair changes the second task's loss (relative transference Z_rel, "
            "'strong' when at least half of the source's own progress, 'no clear effect' within two standard errors): ")
    text = head + "; ".join(parts) + "."
    conflict = result["conflict_rate"]
    worst = max(((conflict[i][j], i, j) for i in range(k) for j in range(i + 1, k)), default=None)
    if worst is not None and worst[0] > 0:
        text += f" Gradients conflict most between {tasks[worst[1]]} and {tasks[worst[2]]} ({worst[0]:.0%} of batches have a negative cosine)."
    elif worst is not None:
        text += " No pair's gradients conflicted on any measured batch."
    return text


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "cogradctl[plot]"') from None


def _plot_heatmaps(result: dict, path: Path) -> None:
    """Heatmaps of Z_rel and cosine (before | after | change when a baseline was measured), diverging
    colour map centred on zero, written atomically."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cogradctl.checkpoint import atomic_write_bytes

    tasks = result["tasks"]
    rows = [("Z_rel", "transference_rel"), ("cosine", "cosine")]
    columns = [("after" if "baseline" in result else "", result)]
    if "baseline" in result:
        columns = [("before", result["baseline"]), ("after", result), ("change", result["delta"])]
    k = len(tasks)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.2 + 1.0 * k * len(columns) + 1.5 * len(columns), 0.9 * k * len(rows) + 1.5 * len(rows)), squeeze=False)
    for r, (label, key) in enumerate(rows):
        mats = [np.array([[np.nan if v is None else v for v in row] for row in src[key]], dtype=float) for _, src in columns]
        for c, ((name, _), m) in enumerate(zip(columns, mats)):
            ax = axes[r][c]
            off = np.abs(m[~np.eye(k, dtype=bool)]) if k > 1 else np.abs(m)
            lim = float(np.nanmax(off)) if off.size and np.isfinite(off).any() and np.nanmax(off) > 0 else 1.0
            im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
            ax.set_xticks(range(k), tasks, rotation=45, ha="right")
            ax.set_yticks(range(k), tasks)
            ax.set_xlabel("target")
            ax.set_ylabel("source")
            ax.set_title(f"{name} {label}".strip())
            for i in range(k):
                for j in range(k):
                    if np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:+.3g}", ha="center", va="center", fontsize=8, color="black" if i != j else "grey")
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


# ---------------------------------------------------------------------------- inspect, models, methods


@command("inspect")
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file.")],
    plugin_path: PluginPath = None,
    json_out: Json = False,
) -> None:
    """Describe a checkpoint: model plugin and config, tasks, features, parameter counts, history."""
    from cogradctl import checkpoint as ckpt_io
    from cogradctl import models

    ckpt = ckpt_io.load(checkpoint)
    net, _ = models.build(ckpt.model, ckpt.schema, ckpt.model_config, _paths(plugin_path))
    ckpt_io.load_into(net, ckpt.state, str(checkpoint))
    split = models.split_parameters(net, ckpt.schema.task_names, ckpt.model)
    doc = {
        "checkpoint": str(checkpoint),
        "model": ckpt.model,
        "config": ckpt.model_config,
        "tasks": {t.name: t.type for t in ckpt.schema.tasks},
        "features": [
            {"name": f.name, "kind": f.kind, **({"vocab_size": len(f.vocab)} if f.kind == "categorical" else {"mean": f.mean, "std": f.std})}
            for f in ckpt.schema.features
        ],
        "parameters": _param_counts(net, split),
        "history": ckpt.history,
    }
    if json_out:
        emit_json(doc)
        return
    stdout.print(f"{checkpoint}: model {ckpt.model} {json.dumps(ckpt.model_config, sort_keys=True)}")
    stdout.print(f"tasks: {', '.join(f'{k} ({v})' for k, v in doc['tasks'].items())}")
    p = doc["parameters"]
    stdout.print(f"parameters: {p['total']} total, {p['shared']} shared, " + ", ".join(f"{t} {n}" for t, n in p["tasks"].items()))
    table = Table(title="features")
    for col in ("feature", "kind", "vocabulary / mean ± std"):
        table.add_column(col)
    for f in doc["features"]:
        table.add_row(f["name"], f["kind"], str(f["vocab_size"]) if f["kind"] == "categorical" else f"{f['mean']:.4g} ± {f['std']:.4g}")
    stdout.print(table)
    table = Table(title="history")
    for col in ("run", "method", "steps", "data", "seed", "time"):
        table.add_column(col)
    for h in ckpt.history:
        table.add_row(h.get("run", ""), h.get("method", ""), str(h.get("steps", "")), str(h.get("data", "")), str(h.get("seed", "")), h.get("time", ""))
    stdout.print(table)


def _registry_doc(kind: str, plugin_path) -> list[dict]:
    from cogradctl import registry

    rows = []
    for name, e in sorted(registry.discover(kind, _paths(plugin_path)).items()):
        row = {"name": name, "source": e.source, "description": e.description, "status": "ok"}
        if e.error:
            row["status"] = f"failed to load: {e.error}"
        elif e.duplicates:
            row["status"] = f"duplicate name, also from {', '.join(e.duplicates)}"
        if kind == "methods" and e.factory is not None:
            row["family"] = getattr(e.factory, "family", "")
            row["paper"] = getattr(e.factory, "paper", "")
            row["options"] = dict(getattr(e.factory, "options", {}))
        if kind == "models" and e.factory is not None:
            from cogradctl.models import config_options

            row["config"] = config_options(e.factory)
        rows.append(row)
    return rows


def _registry_table(title: str, rows: list[dict], columns: list[str]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col, "")
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" if kind_is_config(value) else k for k, v in value.items())
            style = "red" if col == "status" and value != "ok" else ""
            cells.append(f"[{style}]{value}[/]" if style else str(value))
        table.add_row(*cells)
    return table


def kind_is_config(d: dict) -> bool:
    return not all(isinstance(v, str) for v in d.values())


@command("models")
def models_cmd(plugin_path: PluginPath = None, json_out: Json = False) -> None:
    """List the registered model plugins and where each comes from."""
    rows = _registry_doc("models", plugin_path)
    if json_out:
        emit_json({"models": rows})
    else:
        stdout.print(_registry_table("model plugins", rows, ["name", "description", "config", "source", "status"]))


@command("methods")
def methods_cmd(plugin_path: PluginPath = None, json_out: Json = False) -> None:
    """List the registered gradient methods with family, paper, options and origin."""
    rows = _registry_doc("methods", plugin_path)
    if json_out:
        emit_json({"methods": rows})
    else:
        stdout.print(_registry_table("gradient methods", rows, ["name", "family", "description", "paper", "options", "source", "status"]))


# ---------------------------------------------------------------------------- bench


@command("bench")
def bench_cmd(
    methods: Annotated[str, typer.Option(help="Comma-separated methods to time.")] = "ew,cograd,gdod,pcgrad,mgda,cagrad,imtl-g,aligned-mtl,gradvac,nash-mtl",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Your checkpoint (with --data).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Your Parquet data (with --checkpoint).")] = None,
    model: Annotated[Optional[str], typer.Option(help="A model plugin to build fresh (with --synthetic).")] = None,
    synthetic: Annotated[bool, typer.Option(help="Use generated sample data (with --model).")] = False,
    num_tasks: Annotated[int, typer.Option(help="Tasks in the synthetic data.")] = 2,
    config: Annotated[Optional[list[str]], typer.Option("--config", help="Model option KEY=VALUE for --model, repeatable.")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="METHOD.KEY=VALUE option for one method, repeatable.")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per step.")] = 2048,
    steps: Annotated[int, typer.Option(help="Timed steps per method.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 3,
    on_invalid_rows: OnInvalid = "error",
    device: Device = "auto",
    seed: Seed = 0,
    plugin_path: PluginPath = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Time each method's training step against the floor (one forward + K backward passes)."""
    import tempfile

    import torch

    from cogradctl import data as data_io
    from cogradctl import models, sample
    from cogradctl.bench import bench

    if steps < 2 or warmup < 0 or batch_size < 1:
        raise UsageError("--steps must be at least 2, --warmup at least 0, --batch-size positive")
    names = _csv(methods)
    if not names:
        raise UsageError("--methods: give at least one method")
    per_method: dict[str, dict] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        meth, dot, opt = key.partition(".")
        if not sep or not dot or meth not in names:
            raise UsageError(f"--option {item!r}: expected METHOD.KEY=VALUE with METHOD one of {', '.join(names)}")
        per_method.setdefault(meth, {}).update(models.parse_config([f"{opt}={value}"]))
    dev = models.resolve_device(device)
    torch.manual_seed(seed)
    log = Log(quiet)
    if checkpoint is not None and data is not None and model is None and not synthetic:
        ckpt, net, _ = models.from_checkpoint(checkpoint, _paths(plugin_path), dev)
        schema, plugin = ckpt.schema, ckpt.model
        stream = _open_data(data, schema, log, on_invalid_rows)
        dataset = stream.rows([(0, min(stream.num_rows, 8 * batch_size))])  # bench times at most 8 batches
        _report_data(stream, log)
    elif model is not None and synthetic and checkpoint is None and data is None:
        if not 1 <= num_tasks <= 9:
            raise UsageError("--num-tasks must be between 1 and 9")
        tasks = {f"task{k}": (1.0 if k == 0 else 0.5, 0.2) for k in range(num_tasks)}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "synthetic.parquet"
            sample.write(sample.generate(batch_size * 4, tasks, seed=seed), path)
            schema, _ = data_io.infer_schema(str(path), list(tasks), {t: "binary" for t in tasks})
            dataset = data_io.load(str(path), schema)
        net, _ = models.build(model, schema, models.parse_config(config or []), _paths(plugin_path))
        net.to(dev)
        plugin = model
    else:
        raise UsageError("give either --checkpoint and --data, or --model and --synthetic")
    log.info(f"timing {len(names)} method(s) on {plugin}, K={len(schema.tasks)}, batch {batch_size}, {steps} steps each, {dev}")
    split = models.split_parameters(net, schema.task_names, plugin)
    result = bench(net, split, schema, dataset, names, per_method, batch_size, steps, warmup, dev)
    result["model"] = plugin
    widest = max((r["ratio_to_floor_ci95"][1] - r["ratio_to_floor_ci95"][0] for r in result["methods"].values()), default=0.0)
    if widest > 0.1:
        log.warn(f"the timings are noisy (a 95% interval of a ratio to the floor is {widest:.2f} wide): "
                 "raise --steps, or rerun when the machine is quieter")
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{plugin}, K={result['tasks']}, batch {batch_size}, {result['shared_parameters']} shared parameters — {result['device']}")
    for col in ("step", "ms", "p25–p75", "÷ ew", "÷ floor", "95% interval", "peak MB"):
        table.add_column(col, justify="left" if col == "step" else "right")
    lo, hi = result["floor_spread_ms"]
    table.add_row("floor: 1 fwd + K bwd", f"{result['floor_ms']:.2f}", f"{lo:.2f}–{hi:.2f}", "", "1.00", "", "")
    table.add_row("plain: 1 fwd + 1 bwd", f"{result['plain_ms']:.2f}", "", "", f"{result['plain_ms'] / result['floor_ms']:.2f}", "", "")
    for name, r in result["methods"].items():
        peak = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        table.add_row(name, f"{r['step_ms']:.2f}", f"{r['spread_ms'][0]:.2f}–{r['spread_ms'][1]:.2f}",
                      _fmt(r["ratio_to_ew"], 2), f"{r['ratio_to_floor']:.2f}", "{:.2f}–{:.2f}".format(*r["ratio_to_floor_ci95"]), peak)
    m = result["measure_transference"]
    table.add_row("measure-transference batch", f"{m['batch_ms']:.2f}", "", "", f"{m['ratio_to_floor']:.2f} of its floor ({m['floor_ms']:.2f} ms)",
                  "{:.2f}–{:.2f}".format(*m["ratio_to_floor_ci95"]), "")
    stdout.print(table)
    if result["methods"] and next(iter(result["methods"].values()))["peak_mem_mb"] is None:
        stdout.print(f"process peak RSS: {result['process_peak_rss_mb']:.0f} MB (no per-method memory statistics on CPU)")


# ---------------------------------------------------------------------------- sample-data


@command("sample-data")
def sample_data_cmd(
    out: Annotated[Path, typer.Option(help="Directory to write train.parquet and valid.parquet into.")],
    rows: Annotated[int, typer.Option(help="Training rows.")] = 20_000,
    valid_rows: Annotated[int, typer.Option(help="Validation rows.")] = 5_000,
    tasks: Annotated[str, typer.Option(help="NAME=RELATEDNESS[:POSITIVE_RATE],… ; the first task is the anchor.")] = "click=1:0.3,like=0.8:0.2,share=-0.5:0.1",
    seed: Seed = 0,
    json_out: Json = False,
) -> None:
    """Generate the synthetic multi-task dataset of known task relatedness (sample_data/)."""
    from cogradctl import sample

    if rows < 1 or valid_rows < 1:
        raise UsageError("--rows and --valid-rows must be positive")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    try:
        spec = sample.parse_tasks(tasks)
        written = {}
        for name, n, split_seed in (("train", rows, seed * 2 + 1), ("valid", valid_rows, seed * 2 + 2)):
            path = out / f"{name}.parquet"
            sample.write(sample.generate(n, spec, seed=split_seed), path)
            written[name] = {"path": str(path), "rows": n}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if json_out:
        emit_json(written)
    else:
        for name, w in written.items():
            stdout.print(f"{w['path']}  rows={w['rows']}")


# ---------------------------------------------------------------------------- data prepare

_sub = {"no_args_is_help": True, "context_settings": {"help_option_names": ["-h", "--help"]}, "epilog": EXIT_CODES}
data_app = typer.Typer(help="Public data sets: convert raw files to Parquet.", **_sub)
prepare_app = typer.Typer(help="Convert a public data set's raw files to Parquet train/valid/test.", **_sub)
data_app.add_typer(prepare_app, name="prepare")
app.add_typer(data_app, name="data")


@prepare_app.command("census-kdd", epilog=EXIT_CODES)
def census_kdd_cmd(
    source: Annotated[Path, typer.Option(help="Directory with census-income.data.gz and census-income.test.gz (UCI).")],
    out: Annotated[Path, typer.Option(help="Directory to write train/valid/test.parquet and census.json into.")],
    group: Annotated[str, typer.Option(help="Task group: 1 = income,marital; 2 = education,marital; all = the three.")] = "1",
    drop_leaky: Annotated[bool, typer.Option("--drop-leaky", help="Also drop the two household-relationship columns that encode marriage.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the split of the UCI test file into valid and test halves.")] = 2018,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs in --out.")] = False,
    json_out: Json = False,
) -> None:
    """UCI Census-Income (KDD) in the MMoE paper's setup: labels, typed features, valid/test halves."""
    from cogradctl import census

    try:
        summary = census.prepare(source, out, group, drop_leaky, seed, overwrite)
    except CogradError as exc:
        if DEBUG["on"]:
            raise
        stderr.print(f"error: {exc}", markup=False, style="red")
        raise typer.Exit(exc.exit_code) from None
    if json_out:
        emit_json(summary)
        return
    for name, s in summary["splits"].items():
        rates = "  ".join(f"{k}={v:.4f}" for k, v in s["positive_rate"].items())
        stdout.print(f"{s['path']}  rows={s['rows']}  positive rate: {rates}")


# ---------------------------------------------------------------------------- entry point


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    stderr.print(f"warning: {message}", markup=False, style="yellow")


def main() -> None:
    warnings.showwarning = _show_warning
    keep_freed_memory()  # glibc: steps reuse their pages instead of faulting them in again
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
        app()
        return
    # Under torchrun, leave without the interpreter's finalisation: gloo's worker threads can still
    # be releasing the tensors of the last collectives then, and taking the GIL from them during
    # finalisation aborts the process (SIGABRT after a finished run, seen in about 1 run in 5 on a
    # loaded machine with torch 2.13). Every output is written and closed by now.
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
