"""``cogradctl bench``: each method's training step against the floor."""

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
    Seed,
    WeightColumn,
    count,
    csv_list,
    label_options,
    open_data,
    paths,
    report_data,
)
from cogradctl.cli.output import emit_json, fmt, stdout
from cogradctl.console import Log
from cogradctl.errors import UsageError

METHODS = "ew,cograd,gdod,pcgrad,mgda,cagrad,imtl-g,aligned-mtl,gradvac,nash-mtl"


@command("bench")
def bench_cmd(
    methods: Annotated[str, typer.Option(help="Comma-separated methods to time.")] = METHODS,
    checkpoint: Annotated[Path | None, typer.Option(help="Your checkpoint (with --data).")] = None,
    data: Annotated[str | None, typer.Option(help="Your Parquet data (with --checkpoint).")] = None,
    model: Annotated[str | None, typer.Option(help="A model plugin to build fresh (with --synthetic).")] = None,
    synthetic: Annotated[bool, typer.Option(help="Use generated sample data (with --model).")] = False,
    num_tasks: Annotated[int, typer.Option(help="Tasks in the synthetic data.")] = 2,
    config: Annotated[
        list[str] | None, typer.Option("--config", help="Model option KEY=VALUE for --model, repeatable.")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="METHOD.KEY=VALUE option for one method, repeatable.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per step.")] = 2048,
    steps: Annotated[int, typer.Option(help="Timed steps per method.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 3,
    embeddings: Annotated[
        str,
        typer.Option(
            help="Shared embedding tables, as train --embeddings: coordinate, sum, freeze, dense, or auto "
            "(coordinate from 2^24 table numbers on, else dense). Row-sparse (coordinate, sum): the floor's "
            "backward passes give the tables sparse gradients, and no measure-transference batch is timed.",
        ),
    ] = "auto",
    table_rows: Annotated[
        str | None,
        typer.Option(
            help="With --synthetic: two id features more (user_id, item_id), hashed into this many rows "
            "each (N or 2^K), × embedding_dim (16 unless --config embedding_dim=…, for a model that has "
            "that option): a ranking model's "
            "large tables, as benchmarks/embeddings.py measures them.",
        ),
    ] = None,
    on_invalid_rows: OnInvalid = "error",
    missing_labels: MissingLabels = "mask",
    weight_column: WeightColumn = None,
    device: Device = "auto",
    seed: Seed = 0,
    plugin_path: PluginPath = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Time each method's training step against the floor (one forward + K backward passes)."""
    import torch

    from cogradctl import bench as bench_mod
    from cogradctl import models, tables
    from cogradctl.methods import get_method

    if steps < 2 or warmup < 0 or batch_size < 1:
        raise UsageError("--steps must be at least 2, --warmup at least 0, --batch-size positive")
    names = csv_list(methods)
    if not names:
        raise UsageError("--methods: give at least one method")
    per_method = _per_method_options(option or [], names)
    count("--seed", seed, 0)  # a seed must be a non-negative 64-bit integer (torch and numpy take no other)
    labels = label_options(missing_labels, weight_column)
    dev = models.resolve_device(device)
    rows = _table_rows(table_rows, synthetic)
    if embeddings not in tables.MODES:
        raise UsageError(f"--embeddings {embeddings!r}: expected one of {', '.join(tables.MODES)}")
    torch.manual_seed(seed)
    log = Log(quiet)
    if checkpoint is not None and data is not None and model is None and not synthetic:
        ckpt, net, _ = models.from_checkpoint(checkpoint, paths(plugin_path), dev)
        schema, plugin = ckpt.schema, ckpt.model
        stream = open_data(data, schema, log, on_invalid_rows, labels=labels)
        dataset = stream.rows([(0, min(stream.num_rows, 8 * batch_size))])  # bench times at most 8 batches
        report_data(stream, log)
    elif model is not None and synthetic and checkpoint is None and data is None:
        if not 1 <= num_tasks <= 9:
            raise UsageError("--num-tasks must be between 1 and 9")
        settings = models.parse_config(config or [])
        if rows is not None and "embedding_dim" in _model_options(model, plugin_path):
            settings.setdefault("embedding_dim", 16)  # the tables' width in the issue's benchmark
        schema, dataset, net = bench_mod.synthetic_workload(
            model, num_tasks, batch_size * 4, settings, paths(plugin_path), dev, seed, rows
        )
        plugin = model
    else:
        raise UsageError("give either --checkpoint and --data, or --model and --synthetic")
    log.info(
        f"timing {len(names)} method(s) on {plugin}, K={len(schema.tasks)}, batch {batch_size}, "
        f"{steps} steps each, {dev}"
    )
    split = models.split_parameters(net, schema.task_names, plugin)
    mode = tables.resolve(embeddings, net, split)
    for name in names:  # what train refuses with row-sparse tables, refused here before any timing
        tables.check_mode(mode, get_method(name, **per_method.get(name, {})))
    if tables.embedding_tables(net, split):
        log.info(tables.describe(mode, net, split))
    with log.progress("bench rounds", warmup + steps) as advance:  # a bar on a terminal only
        result = bench_mod.bench(
            net, split, schema, dataset, names, per_method, batch_size, steps, warmup, dev, advance, mode
        )
    result["model"] = plugin
    ci = [r["ratio_to_floor_ci95"] for r in result["methods"].values()]
    widest = max((hi - lo for lo, hi in ci), default=0.0)
    if widest > 0.1:
        log.warn(
            f"the timings are noisy (a 95% interval of a ratio to the floor is {widest:.2f} wide): "
            "raise --steps, or rerun when the machine is quieter"
        )
    if json_out:
        emit_json(result)
        return
    _print(result, plugin, batch_size)


def _model_options(model: str, plugin_path) -> dict:
    """The config keys the model plugin takes (``--table-rows`` sets embedding_dim where it has one)."""
    from cogradctl import models, registry

    return models.config_options(registry.lookup("models", model, paths(plugin_path)))


def _table_rows(text: str | None, synthetic: bool) -> int | None:
    """``--table-rows N`` or ``2^K`` → N (1 ≤ N ≤ 2^31); only with --synthetic."""
    if text is None:
        return None
    if not synthetic:
        raise UsageError("--table-rows: only with --model and --synthetic (your checkpoint's tables are its own)")
    base, caret, power = text.strip().partition("^")
    try:
        if caret:  # 2^K, K checked before the power is taken
            rows = 2 ** int(power) if base.strip() == "2" and 0 <= int(power) <= 31 else None
        else:
            rows = int(text)
    except ValueError:
        rows = None
    if rows is None or not 1 <= rows <= 2**31:
        raise UsageError(f"--table-rows {text!r}: expected a number of rows N or 2^K, between 1 and 2^31")
    return rows


def _per_method_options(items: list[str], names: list[str]) -> dict[str, dict]:
    """``--option METHOD.KEY=VALUE`` values → {method: {key: value}}."""
    from cogradctl.models import parse_config

    per_method: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        meth, dot, opt = key.partition(".")
        if not sep or not dot or meth not in names:
            raise UsageError(f"--option {item!r}: expected METHOD.KEY=VALUE with METHOD one of {', '.join(names)}")
        per_method.setdefault(meth, {}).update(parse_config([f"{opt}={value}"]))
    return per_method


def _print(result: dict, plugin: str, batch_size: int) -> None:
    e = result.get("embeddings")
    besides = " besides the tables" if e and e["mode"] in ("coordinate", "sum") else ""
    table = Table(
        title=f"{plugin}, K={result['tasks']}, batch {batch_size}, {result['shared_parameters']} shared parameters"
        f"{besides} — {result['device']}"
    )
    on_gpu = next(iter(result["methods"].values()), {}).get("peak_mem_mb") is not None
    columns = ("step", "ms", "p25–p75", "÷ ew", "÷ floor", "95% interval") + (("peak MB",) if on_gpu else ())
    for col in columns:  # peak memory per method is measured on CUDA only: no empty column on the CPU
        table.add_column(col, justify="left" if col == "step" else "right")
    lo, hi = result["floor_spread_ms"]
    floor, plain = result["floor_ms"], result["plain_ms"]
    pad = ("",) if on_gpu else ()
    table.add_row("floor: 1 fwd + K bwd", f"{floor:.2f}", f"{lo:.2f}–{hi:.2f}", "", "1.00", "", *pad)
    table.add_row("plain: 1 fwd + 1 bwd", f"{plain:.2f}", "", "", f"{plain / floor:.2f}", "", *pad)
    for name, r in result["methods"].items():
        peak = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        table.add_row(
            name,
            f"{r['step_ms']:.2f}",
            f"{r['spread_ms'][0]:.2f}–{r['spread_ms'][1]:.2f}",
            fmt(r["ratio_to_ew"], 2),
            f"{r['ratio_to_floor']:.2f}",
            "{:.2f}–{:.2f}".format(*r["ratio_to_floor_ci95"]),
            *((peak,) if on_gpu else ()),
        )
    m = result["measure_transference"]
    if m is not None:  # not timed with row-sparse tables
        table.add_row(
            "measure-transference batch",
            f"{m['batch_ms']:.2f}",
            "",
            "",
            f"{m['ratio_to_floor']:.2f} of its floor ({m['floor_ms']:.2f} ms)",
            "{:.2f}–{:.2f}".format(*m["ratio_to_floor_ci95"]),
            *pad,
        )
    stdout.print(table)
    if result.get("embeddings"):
        stdout.print(_tables_line(result["embeddings"]))
    if not on_gpu:
        stdout.print(
            f"process peak RSS: {result['process_peak_rss_mb']:.0f} MB (no per-method memory statistics on CPU)"
        )


def _tables_line(e: dict) -> str:
    """The embedding tables under the table: their sizes, the mode, the rows a step touched."""
    sizes = ", ".join(f"{t['name']} {t['rows']:,} × {t['dim']}" for t in e["tables"])
    touched = "" if e["touched_rows"] is None else f"; the last step touched {e['touched_rows']:,} rows"
    return (
        f"embedding tables: {sizes} (--embeddings {e['mode']}); tables + 2 Adam moments "
        f"{e['tables_and_adam_mb']:,.0f} MB{touched}"
    )
