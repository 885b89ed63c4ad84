"""Name → factory registries filled from entry-point groups (and, for files, a plugin path).

Built-ins register through the same entry-point groups as third-party packages
(``cogradctl.models`` and ``cogradctl.methods`` in ``pyproject.toml``), so the two are
treated alike. A plugin file given with ``--plugin-path DIR`` / ``COGRADCTL_PLUGIN_PATH`` is a
``.py`` file that defines ``MODELS = {"name": factory}`` and/or ``METHODS = {"name": factory}``.

A plugin that fails to import is recorded with its cause and does not break the others; a name
registered twice is an error when it is used; an unknown name is answered with the known ones.
A plugin file that fails to import cannot say which names it registers, so they are read from its
source (a module-level ``MODELS = {"name": …}`` literal or ``MODELS["name"] = …``): asking for one
of them gives the import error, not "unknown model" (its file name stands in when none is found).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from cogradctl.errors import PluginError

GROUPS = {"models": "cogradctl.models", "methods": "cogradctl.methods"}
# The module-level dict a plugin file defines for each kind.
FILE_ATTRS = {"models": "MODELS", "methods": "METHODS"}


@dataclass
class Entry:
    name: str
    source: str  # "built-in", "package <dist>", or "file <path>"
    factory: Callable[..., Any] | None = None
    error: str | None = None  # why it could not be loaded
    duplicates: list[str] = field(default_factory=list)  # other sources of the same name

    @property
    def description(self) -> str:
        """The first line of the factory's docstring, as plain text."""
        doc = plain(getattr(self.factory, "__doc__", None) or "")
        return doc.splitlines()[0] if doc else ""


def plugin_paths(extra: list[str] | None = None) -> list[Path]:
    """Directories from the option, then from ``COGRADCTL_PLUGIN_PATH`` (os.pathsep-separated)."""
    dirs = list(extra or [])
    env = os.environ.get("COGRADCTL_PLUGIN_PATH", "")
    dirs += [d for d in env.split(os.pathsep) if d]
    paths = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise PluginError(f"plugin path {d}: not a directory (expected a folder of plugin .py files)")
        paths.append(p)
    return paths


def _load_file(path: Path) -> Any:
    name = f"cogradctl_plugin_file_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _add(found: dict[str, Entry], entry: Entry) -> None:
    if entry.name in found:
        found[entry.name].duplicates.append(entry.source)
    else:
        found[entry.name] = entry


def discover(kind: str, extra_paths: list[str] | None = None, only: str | None = None) -> dict[str, Entry]:
    """All registered entries of ``kind`` ("models" or "methods"), broken ones included.

    ``only``: of the installed packages' entry points, load only those registered under that name
    (plugin files are still all read: their names are only known once they run). Loading an entry
    point imports its module, and the rechub-* bridges import torch-rechub and scikit-learn, seconds
    that a command using the built-in mmoe should not pay.
    """
    found: dict[str, Entry] = {}
    for ep in sorted(entry_points(group=GROUPS[kind]), key=lambda e: e.name):
        if only is not None and ep.name != only:
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        source = "built-in" if dist == "cogradctl" else f"package {dist}"
        entry = Entry(ep.name, source)
        try:
            entry.factory = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            entry.error = f"{type(exc).__name__}: {exc}"
        _add(found, entry)
    for directory in plugin_paths(extra_paths):
        for path in sorted(directory.glob("*.py")):
            try:
                module = _load_file(path)
            except Exception as exc:
                # Record it under the names its source registers (or its file name, if none is found).
                error = f"{type(exc).__name__}: {exc}"
                for name in declared_names(path, kind):
                    _add(found, Entry(name, f"file {path}", error=error))
                continue
            for name, factory in getattr(module, FILE_ATTRS[kind], {}).items():
                _add(found, Entry(name, f"file {path}", factory=factory))
    return found


def declared_names(path: Path, kind: str) -> list[str]:
    """The names a plugin file registers for ``kind``, read from its source without running it.

    Finds module-level ``MODELS = {"a": …}`` (or annotated) dict literals and ``MODELS["a"] = …``
    assignments. A file that registers nothing of ``kind`` this way while registering the other kind
    gives no names; a file whose source says nothing readable gives its file name.
    """
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"), str(path))
    except (SyntaxError, ValueError, OSError):
        return [path.stem]
    names: dict[str, list[str]] = {k: [] for k in FILE_ATTRS}
    attrs = {attr: k for k, attr in FILE_ATTRS.items()}
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        value = getattr(node, "value", None)
        for target in targets:
            if isinstance(target, ast.Name) and target.id in attrs and isinstance(value, ast.Dict):
                keys = [k.value for k in value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
                names[attrs[target.id]] += keys
            elif (
                isinstance(target, ast.Subscript)
                and isinstance(target.value, ast.Name)
                and target.value.id in attrs
                and isinstance(target.slice, ast.Constant)
                and isinstance(target.slice.value, str)
            ):
                names[attrs[target.value.id]].append(target.slice.value)
    if names[kind]:
        return list(dict.fromkeys(names[kind]))
    return [] if any(names.values()) else [path.stem]


def _failed_hint(found: dict[str, Entry]) -> str:
    """The plugins that failed to load, grouped by cause (the rechub-* bridges without their extra
    share one), so that an unknown name that is one of them shows why rather than only "unknown"."""
    causes: dict[tuple[str, str], list[str]] = {}
    for e in sorted(found.values(), key=lambda e: e.name):
        if e.error is not None:
            causes.setdefault((e.source, e.error), []).append(f"'{e.name}'")
    if not causes:
        return ""
    parts = [f"{', '.join(names)} ({source}): {error}" for (source, error), names in list(causes.items())[:3]]
    more = f" and {len(causes) - 3} more" if len(causes) > 3 else ""
    return "; plugins that failed to load (it may be one of them): " + "; ".join(parts) + more


def closest(name: str, names) -> str:
    """``"; did you mean 'x'?"`` for the name closest to a misspelt ``name``, or ``""``."""
    close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def lookup(kind: str, name: str, extra_paths: list[str] | None = None, hint: str = "") -> Callable[..., Any]:
    """The factory registered as ``name``, or a PluginError saying what is known or what broke (an
    unknown name: the closest known one, then ``hint``, then the known names)."""
    found = discover(kind, extra_paths, only=name)
    singular = kind[:-1]
    entry = found.get(name)
    if entry is None:
        found = discover(kind, extra_paths)  # every plugin, for the known names and those that failed
        known = ", ".join(sorted(n for n, e in found.items() if e.error is None)) or "none"
        hint = f" ({hint})" if hint else ""
        raise PluginError(
            f"unknown {singular} '{name}'{hint}{closest(name, found)}; known {kind}: {known}{_failed_hint(found)}"
        )
    if entry.duplicates:
        sources = ", ".join([entry.source, *entry.duplicates])
        raise PluginError(f"{singular} '{name}' is registered more than once ({sources}); uninstall or rename one")
    if entry.error is not None:
        raise PluginError(f"{singular} '{name}' ({entry.source}) failed to load: {entry.error}")
    return entry.factory


def plain(doc: str) -> str:
    """A docstring as plain text: dedented, without its doctest examples; reST/markdown literals
    (````x````, ```x```) and emphasis (``**x**``) shown as their text; each paragraph and each
    bulleted item joined into one line (indented blocks, such as formulas, kept as they are)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc or "")):
        lines = [line.rstrip() for line in block.splitlines() if line.strip()]
        if not lines or any(line.lstrip().startswith(">>>") for line in lines):
            continue
        if all(line.startswith(" ") for line in lines):
            text = "\n".join(lines)
        else:
            items: list[str] = []
            for line in lines:
                if not items or line.lstrip().startswith(("* ", "- ")):
                    items.append(line.strip())
                else:
                    items[-1] += " " + line.strip()
            text = "\n".join(items)
        paragraphs.append(re.sub(r"\*\*(.+?)\*\*", r"\1", re.sub(r"``?([^`]+?)``?", r"\1", text)))
    return "\n\n".join(paragraphs)


def details(kind: str, name: str, extra_paths: list[str] | None = None) -> dict:
    """What ``cogradctl methods NAME`` / ``models NAME`` shows: the entry's source, summary and
    description (plain text), a method's family and paper, and each option with its type, default
    and meaning (from the factory's signature and its ``options`` descriptions, a method's
    convention). A PluginError like ``lookup``'s for a name that is unknown, duplicated or broken."""
    factory = lookup(kind, name, extra_paths)
    entry = discover(kind, extra_paths, only=name)[name]  # lookup found it: load no other plugin
    text = plain(getattr(factory, "__doc__", None) or "")
    summary, _, rest = text.partition("\n\n")
    module = sys.modules.get(getattr(factory, "__module__", ""))
    if not rest and kind == "methods" and module is not None:  # a built-in method explains itself there
        rest = plain(module.__doc__ or "").partition("\n\n")[2]
    doc = {"name": name, "source": entry.source, "summary": summary, "description": rest}
    if kind == "methods":
        doc["family"] = getattr(factory, "family", "")
        doc["paper"] = getattr(factory, "paper", "")
    meanings = getattr(factory, "options", None)
    meanings = meanings if isinstance(meanings, dict) else {}
    doc["options"] = [
        {"name": p.name, "type": _type_name(p), "default": _default(p), "meaning": plain(str(meanings.get(p.name, "")))}
        for p in _option_params(factory, skip_first=kind == "models")
    ]
    return doc


def _option_params(factory, skip_first: bool) -> list[inspect.Parameter]:
    """The keyword options of a factory: its signature's parameters (a model's after ``schema``),
    without ``*args``/``**kwargs``."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return []
    params = params[1:] if skip_first else params
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _type_name(p: inspect.Parameter) -> str:
    """The option's annotation as written, else the type of its default ("" when neither says)."""
    if p.annotation is not p.empty:
        return p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
    if p.default is p.empty or p.default is None:
        return ""
    return type(p.default).__name__


def _default(p: inspect.Parameter):
    """The default as JSON would hold it (None when there is none; ``required`` is then true)."""
    if p.default is p.empty:
        return None
    return (
        p.default
        if isinstance(p.default, (bool, int, float, str, list, dict)) or p.default is None
        else repr(p.default)
    )
