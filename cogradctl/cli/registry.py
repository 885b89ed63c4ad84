"""``cogradctl models`` and ``cogradctl methods``: the registered plugins and where each comes from."""

from __future__ import annotations

from rich.table import Table

from cogradctl.cli.core import command
from cogradctl.cli.options import Json, PluginPath, paths
from cogradctl.cli.output import emit_json, stdout


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
        columns = ["name", "family", "description", "paper", "options", "source", "status"]
        stdout.print(_registry_table("gradient methods", rows, columns))


def _registry_doc(kind: str, plugin_path) -> list[dict]:
    from cogradctl import registry

    rows = []
    for name, e in sorted(registry.discover(kind, paths(plugin_path)).items()):
        row = {"name": name, "source": e.source, "description": e.description, "status": "ok"}
        if e.error:
            row["status"] = f"failed to load: {e.error}"
        elif e.duplicates:
            row["status"] = f"duplicate name, also from {', '.join(e.duplicates)}"
        if kind == "methods" and e.factory is not None:
            row["family"] = getattr(e.factory, "family", "")
            row["paper"] = getattr(e.factory, "paper", "")
            row["options"] = dict(getattr(e.factory, "options", {}))
        if kind == "models":  # None: the plugin failed to load, so its options cannot be read
            from cogradctl.models import config_options

            row["config"] = config_options(e.factory) if e.factory is not None else None
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
    """A dict of defaults (a model's config: printed KEY=VALUE), not of descriptions (a method's options)."""
    return not all(isinstance(v, str) for v in d.values())
