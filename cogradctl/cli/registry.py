"""``cogradctl models`` and ``cogradctl methods``: the registered plugins and where each comes from;
with a NAME, one of them in detail (its options with type, default and meaning)."""

from __future__ import annotations

import json
import shutil
import textwrap
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from cogradctl.cli.core import command
from cogradctl.cli.options import Json, PluginPath, paths
from cogradctl.cli.output import emit_json, stdout

# How each kind's options are given on the command line.
HOW_TO_SET = {
    "models": "config, set with init/import --config KEY=VALUE (JSON values)",
    "methods": "options, set with train -o KEY=VALUE (or --gamma / --weights)",
}


def _name(kind: str):
    return Annotated[
        str | None,
        typer.Argument(
            help=f"Describe this {kind[:-1]}: its options with type, default and meaning.",
            metavar="NAME",
            show_default=False,
        ),
    ]


ModelName = _name("models")
MethodName = _name("methods")


@command("models")
def models_cmd(name: ModelName = None, plugin_path: PluginPath = None, json_out: Json = False) -> None:
    """List the registered model plugins and where each comes from, or describe one (NAME)."""
    if name is not None:
        _detail("models", name, plugin_path, json_out)
        return
    rows = _registry_doc("models", plugin_path)
    if json_out:
        emit_json({"models": rows})
    else:
        stdout.print(_registry_table("model plugins", "models", rows, ["name", "description"]))


@command("methods")
def methods_cmd(name: MethodName = None, plugin_path: PluginPath = None, json_out: Json = False) -> None:
    """List the registered gradient methods, or describe one (NAME): family, paper, options."""
    if name is not None:
        _detail("methods", name, plugin_path, json_out)
        return
    rows = _registry_doc("methods", plugin_path)
    if json_out:
        emit_json({"methods": rows})
    else:
        stdout.print(_registry_table("gradient methods", "methods", rows, ["name", "family", "description"]))


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


def _registry_table(title: str, kind: str, rows: list[dict], columns: list[str]) -> Table:
    """The list: names never cut, the description wrapped; under it, for a plugin that is not built
    in, where it comes from, and for one that is broken, why (the rest is in ``KIND NAME`` and --json)."""
    table = Table(title=title, caption=f"options of one: cogradctl {kind} NAME", caption_justify="left")
    for col in columns:
        table.add_column(col, no_wrap=col == "name", overflow="fold")
    for row in rows:
        cells = [Text(str(row.get(col) or "")) for col in columns]
        if row["source"] != "built-in":
            cells[-1].append(f"\n({row['source']})", style="dim")
        if row["status"] != "ok":
            cells[-1].append(f"\n{row['status']}", style="red")
        table.add_row(*cells)
    return table


def _detail(kind: str, name: str, plugin_path, json_out: bool) -> None:
    from cogradctl import registry

    doc = registry.details(kind, name, paths(plugin_path))
    if json_out:
        emit_json(doc)
        return
    width = max(40, min(shutil.get_terminal_size((80, 24)).columns, 100))
    facts = [("family", doc.get("family")), ("paper", doc.get("paper"))]
    lines = [doc["name"], *_wrap_text(doc["summary"], width)]
    lines += [line for key, value in facts if value for line in _wrap_text(f"{key}: {value}", width, "  ")]
    lines.append(f"source: {doc['source']}")  # a path stays on one line
    if doc["description"]:
        lines.append("")
        lines += _wrap_text(doc["description"], width)
    stdout.print("\n".join(lines), markup=False, highlight=False)
    if not doc["options"]:
        stdout.print(f"\nno {HOW_TO_SET[kind].split(',')[0]}", markup=False)
        return
    table = Table(title=f"{HOW_TO_SET[kind]}", title_justify="left", box=None, pad_edge=False)
    for col in ("name", "type", "default", "meaning"):
        table.add_column(col, no_wrap=col != "meaning", overflow="fold")
    for option in doc["options"]:
        default = "" if option["default"] is None else json.dumps(option["default"], ensure_ascii=False)
        table.add_row(*(Text(str(v)) for v in (option["name"], option["type"], default, option["meaning"])))
    stdout.print()
    stdout.print(table)


def _wrap_text(text: str, width: int, indent: str = "") -> list[str]:
    """Plain-text paragraphs wrapped to ``width``: bulleted items with a hanging indent, indented
    blocks (formulas) as they are."""
    lines: list[str] = []
    for paragraph in text.split("\n\n"):
        for item in paragraph.splitlines():
            if item.startswith(" "):
                lines.append(item)
            else:
                hanging = "  " if item.startswith(("* ", "- ")) else indent
                lines += textwrap.wrap(item, width, subsequent_indent=hanging, break_on_hyphens=False) or [""]
        lines.append("")
    return lines[:-1]
