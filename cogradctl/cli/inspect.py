"""``cogradctl inspect``: describe a checkpoint."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from cogradctl.cli.core import command
from cogradctl.cli.options import Json, PluginPath, paths
from cogradctl.cli.output import emit_json, stdout
from cogradctl.console import Log


@command("inspect")
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file.", metavar="CHECKPOINT")],
    plugin_path: PluginPath = None,
    json_out: Json = False,
) -> None:
    """Describe a checkpoint: model plugin and config, tasks, features, parameter counts, history.

    Everything but the per-task parameter counts comes from the file itself: a checkpoint whose model
    plugin is not registered here (a plugin file without --plugin-path) is described all the same,
    with a warning, and its parameters as the number of stored weight elements.
    """
    from cogradctl import checkpoint as ckpt_io
    from cogradctl import models
    from cogradctl.errors import PluginError

    ckpt = ckpt_io.read_checked(checkpoint)
    stored = sum(math.prod(shape) for shape in ckpt_io.stored_shapes(checkpoint).values())
    try:
        _, net, split = models.from_checkpoint(checkpoint, paths(plugin_path))
        parameters, plugin_error = models.parameter_counts(net, split), None
    except PluginError as exc:
        parameters, plugin_error = None, str(exc)
        Log().warn(f"{checkpoint}: {exc}; described without it (per-task parameter counts need the plugin)")
    doc = {
        "checkpoint": str(checkpoint),
        "model": ckpt.model,
        "plugin_error": plugin_error,
        "config": ckpt.model_config,
        "tasks": {t.name: t.type for t in ckpt.schema.tasks},
        "features": [
            {
                "name": f.name,
                "kind": f.kind,
                **(_categorical(f) if f.kind in ("categorical", "sequence") else _dense(f)),
            }
            for f in ckpt.schema.features
        ],
        "parameters": parameters,  # None without the plugin
        "stored_elements": stored,
        "history": ckpt.history,
    }
    if json_out:
        emit_json(doc)
        return
    _print(checkpoint, ckpt, doc)


def _categorical(f) -> dict:
    """A categorical feature's encoding: its spec as ``--encoding`` writes it, its rows, its vocabulary size."""
    spec = f.encoding
    if f.encoding in ("identity", "hash"):
        spec += f":{f.buckets}"
    if f.encoding != "vocab":
        spec += "".join(f":{k}={v}" for k, v in (("oov", f.oov), ("pad", f.pad)) if v is not None)
    vocab = {"vocab_size": len(f.vocab)} if f.encoding in ("vocab", "vocab-file") else {}
    lists = {"max_len": f.max_len} if f.kind == "sequence" else {}
    return {"encoding": spec, "rows": f.cardinality, **vocab, **lists}


def _dense(f) -> dict:
    size = {"size": f.size} if f.kind == "vector" else {}
    return {"mean": f.mean, "std": f.std, "scaling": f.scaling, **size}


def _cell(value) -> Text:
    """A history or feature value as plain text (never Rich markup): strings as they are, other
    JSON values as JSON, a missing value as nothing."""
    if value is None:
        return Text("")
    return Text(value if isinstance(value, str) else json.dumps(value, default=str))


def _print(checkpoint: Path, ckpt, doc: dict) -> None:
    say = functools.partial(stdout.print, markup=False, highlight=False)
    say(f"{checkpoint}: model {ckpt.model} {json.dumps(ckpt.model_config, sort_keys=True)}")
    say(f"tasks: {', '.join(f'{k} ({v})' for k, v in doc['tasks'].items())}")
    p = doc["parameters"]
    if p is None:
        say(f"parameters: {doc['stored_elements']} stored weight elements (model plugin not loaded)")
    else:
        counts = ", ".join(f"{t} {n}" for t, n in p["tasks"].items())
        say(f"parameters: {p['total']} total, {p['shared']} shared, {counts}")
    table = Table(title="features")
    for col in ("feature", "kind", "encoding", "rows / mean ± std"):
        table.add_column(col)
    for f in doc["features"]:
        if f["kind"] in ("categorical", "sequence"):
            length = f" × max_len {f['max_len']}" if "max_len" in f else ""
            table.add_row(_cell(f["name"]), f["kind"], _cell(f["encoding"]), f"{f['rows']}{length}")
        elif f["kind"] == "vector":
            table.add_row(_cell(f["name"]), f["kind"], f"{f['size']} values", "as stored")
        else:
            spread = f"{f['mean']:.4g} ± {f['std']:.4g}" if f["scaling"] == "standard" else "as stored"
            table.add_row(_cell(f["name"]), f["kind"], f"scaling {f['scaling']}", spread)
    stdout.print(table)
    table = Table(title="history")
    for col in ("run", "method", "steps", "data", "seed", "time"):
        table.add_column(col)
    for h in ckpt.history:
        table.add_row(*(_cell(h.get(key)) for key in ("run", "method", "steps", "data", "seed", "time")))
    stdout.print(table)
