"""Model plugins: build a model from the registry, load a checkpoint into it, split its parameters.

The plugin contract (see README "Writing a model plugin"): a factory ``(schema, **config) ->
torch.nn.Module`` registered in the ``cogradctl.models`` entry-point group (or a plugin file's
``MODELS`` dict); the module's ``forward(batch)`` returns ``{task: output}`` (B-vectors: logits for
binary tasks, predictions for regression tasks); ``task_parameters()`` returns ``{task: [parameter
names]}``, the parameters only that task's loss depends on. Every other parameter is shared.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cogradctl import checkpoint as ckpt_io
from cogradctl import registry
from cogradctl.errors import PluginError, UsageError
from cogradctl.schema import Schema


def parse_config(pairs: list[str]) -> dict:
    """``["num_experts=4", "expert=[64,32]", "name=x"]`` → dict; values are JSON, else strings."""
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--config {pair!r}: expected KEY=VALUE")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def config_options(factory) -> dict:
    """A factory's options and their defaults, from its signature (everything after ``schema``)."""
    params = list(inspect.signature(factory).parameters.values())[1:]
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in params
        if p.kind is not p.VAR_KEYWORD
    }


def build(name: str, schema: Schema, config: dict, plugin_paths: list[str] | None = None) -> tuple[nn.Module, dict]:
    """The model ``name`` built for ``schema``; returns it with its effective config (defaults filled)."""
    factory = registry.lookup("models", name, plugin_paths)
    options = config_options(factory)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    unknown = sorted(set(config) - set(options))
    if unknown and not accepts_any:
        raise UsageError(
            f"model '{name}' has no config key {', '.join(unknown)}; its keys: {', '.join(options) or 'none'}"
        )
    effective = {**options, **config}
    try:
        model = factory(schema, **config)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"model '{name}' rejected its config: {exc}") from exc
    except ImportError as exc:  # a factory that imports its library lazily, when it is called
        raise PluginError(f"model plugin '{name}' failed to load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module) or not hasattr(model, "task_parameters"):
        raise PluginError(f"model plugin '{name}' must return a torch.nn.Module with a task_parameters() method")
    return model, effective


@dataclass
class ParamSplit:
    """The model's trainable parameters: shared (in a fixed order) and each task's own."""

    shared_names: list[str]
    shared: list[nn.Parameter]
    tasks: dict[str, list[nn.Parameter]]
    task_names: dict[str, list[str]]
    # Set by ``taskgrad.flatten_shared``: one P-vector whose slices the shared parameters are.
    flat: nn.Parameter | None = None

    @property
    def num_shared(self) -> int:
        return sum(p.numel() for p in self.shared)


def split_parameters(model: nn.Module, tasks: list[str], plugin: str = "model") -> ParamSplit:
    named = dict(model.named_parameters())
    owned = model.task_parameters()
    if set(owned) != set(tasks):
        raise PluginError(
            f"model plugin '{plugin}': task_parameters() names tasks {sorted(owned)}, the schema has {tasks}"
        )
    seen: dict[str, str] = {}
    for task, names in owned.items():
        for n in names:
            if n not in named:
                raise PluginError(f"model plugin '{plugin}': task_parameters() names '{n}', which is not a parameter")
            if n in seen:
                raise PluginError(f"model plugin '{plugin}': parameter '{n}' is claimed by tasks {seen[n]} and {task}")
            seen[n] = task
    shared_names = [n for n, p in named.items() if n not in seen and p.requires_grad]
    if not shared_names:
        raise PluginError(
            f"model plugin '{plugin}' has no shared parameters: nothing for a multi-task method to coordinate"
        )
    return ParamSplit(
        shared_names=shared_names,
        shared=[named[n] for n in shared_names],
        tasks={t: [named[n] for n in owned[t] if named[n].requires_grad] for t in tasks},
        task_names={t: list(owned[t]) for t in tasks},
    )


def parameter_counts(model: nn.Module, split: ParamSplit) -> dict:
    """Parameter counts: shared, each task's own, and the model's total."""
    return {
        "shared": split.num_shared,
        "tasks": {t: sum(p.numel() for p in ps) for t, ps in split.tasks.items()},
        "total": sum(p.numel() for p in model.parameters()),
    }


def from_checkpoint(path: str | Path, plugin_paths: list[str] | None = None, device: torch.device | str = "cpu"):
    """Load a checkpoint and its model: → (checkpoint, model on ``device``, parameter split)."""
    ckpt = ckpt_io.load(path)
    model, _ = build(ckpt.model, ckpt.schema, ckpt.model_config, plugin_paths)
    ckpt_io.load_into(model, ckpt.state, str(path))
    model.to(device)
    return ckpt, model, split_parameters(model, ckpt.schema.task_names, ckpt.model)


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
