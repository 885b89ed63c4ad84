"""``cogradctl inspect``: describe a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cogradctl.cli.core import command
from cogradctl.cli.options import Json, PluginPath, paths
from cogradctl.cli.output import emit_json, stdout


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
    net, _ = models.build(ckpt.model, ckpt.schema, ckpt.model_config, paths(plugin_path))
    ckpt_io.load_into(net, ckpt.state, str(checkpoint))
    split = models.split_parameters(net, ckpt.schema.task_names, ckpt.model)
    doc = {
        "checkpoint": str(checkpoint),
        "model": ckpt.model,
        "config": ckpt.model_config,
        "tasks": {t.name: t.type for t in ckpt.schema.tasks},
        "features": [
            {
                "name": f.name,
                "kind": f.kind,
                **({"vocab_size": len(f.vocab)} if f.kind == "categorical" else {"mean": f.mean, "std": f.std}),
            }
            for f in ckpt.schema.features
        ],
        "parameters": models.parameter_counts(net, split),
        "history": ckpt.history,
    }
    if json_out:
        emit_json(doc)
        return
    _print(checkpoint, ckpt, doc)


def _print(checkpoint: Path, ckpt, doc: dict) -> None:
    stdout.print(f"{checkpoint}: model {ckpt.model} {json.dumps(ckpt.model_config, sort_keys=True)}")
    stdout.print(f"tasks: {', '.join(f'{k} ({v})' for k, v in doc['tasks'].items())}")
    p = doc["parameters"]
    stdout.print(
        f"parameters: {p['total']} total, {p['shared']} shared, " + ", ".join(f"{t} {n}" for t, n in p["tasks"].items())
    )
    table = Table(title="features")
    for col in ("feature", "kind", "vocabulary / mean ± std"):
        table.add_column(col)
    for f in doc["features"]:
        spread = str(f["vocab_size"]) if f["kind"] == "categorical" else f"{f['mean']:.4g} ± {f['std']:.4g}"
        table.add_row(f["name"], f["kind"], spread)
    stdout.print(table)
    table = Table(title="history")
    for col in ("run", "method", "steps", "data", "seed", "time"):
        table.add_column(col)
    for h in ckpt.history:
        table.add_row(
            h.get("run", ""),
            h.get("method", ""),
            str(h.get("steps", "")),
            str(h.get("data", "")),
            str(h.get("seed", "")),
            h.get("time", ""),
        )
    stdout.print(table)
