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
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cogradctl import checkpoint as ckpt_io
from cogradctl import registry
from cogradctl.errors import CheckpointError, OutOfMemory, PluginError, UsageError
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


# Without a checkpoint to compare with: a model with more modules than this is not a ranking model
# but a config gone wrong (a num_experts of 10**12 would build Python objects until memory ran out).
MAX_MODULES = 20_000


class TooLarge(Exception):
    """Raised from the registration hooks when a model being built exceeds its budget."""


@dataclass(frozen=True)
class Budget:
    """The most parameter and buffer elements, and submodules, a model may register."""

    elements: int
    modules: int

    @classmethod
    def machine(cls) -> Budget:
        """Without a checkpoint: half this machine's memory in float32 numbers, ``MAX_MODULES``."""
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory = 1 << 36
        return cls(memory // 8, MAX_MODULES)

    @classmethod
    def stored(cls, shapes: dict[str, tuple]) -> Budget:
        """For a checkpoint storing weights of these shapes: twice its elements (tied or repeated
        registrations) and 8 modules per tensor (containers, activations), plus a margin."""
        return cls(2 * sum(math.prod(s) for s in shapes.values()) + (1 << 20), 8 * len(shapes) + 1000)


@contextmanager
def bounded(budget: Budget):
    """Raise TooLarge as soon as the modules built inside the block register more elements or
    submodules than ``budget``."""
    from torch.nn.modules import module as nn_module

    count = {"elements": 0, "modules": 0}

    def on_tensor(module, name, tensor):
        if tensor is not None:
            count["elements"] += tensor.numel()
            if count["elements"] > budget.elements:
                raise TooLarge(f"more than {budget.elements} parameter and buffer elements")

    def on_module(module, name, submodule):
        count["modules"] += 1
        if count["modules"] > budget.modules:
            raise TooLarge(f"more than {budget.modules} modules")

    handles = [
        nn_module.register_module_parameter_registration_hook(on_tensor),
        nn_module.register_module_buffer_registration_hook(on_tensor),
        nn_module.register_module_module_registration_hook(on_module),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# Said when a checkpoint names a model that is not registered here (a plugin file left off, or a
# package not installed).
SAVED_WITH = (
    "{source} was saved with a model plugin that is not registered here: for a plugin file, "
    "pass --plugin-path DIR or set COGRADCTL_PLUGIN_PATH; for a package, install it"
)


def build(
    name: str,
    schema: Schema,
    config: dict,
    plugin_paths: list[str] | None = None,
    budget: Budget | None = None,
    expected: dict[str, tuple] | None = None,
    source: str = "",
    meta_only: bool = False,
) -> tuple[nn.Module | None, dict]:
    """The model ``name`` built for ``schema``; returns it with its effective config (defaults filled).

    It is first built on the ``meta`` device (nothing allocated) within ``budget`` (default:
    ``Budget.machine()``) and its tensor shapes compared with ``expected`` (a checkpoint's stored
    shapes, the checkpoint named by ``source``); only a model that passes is built for real
    (``meta_only``: not at all; → ``(None, config)``). A plugin that cannot be built on the meta
    device is built directly, under the same budget.
    """
    factory = registry.lookup("models", name, plugin_paths, SAVED_WITH.format(source=source) if source else "")
    options = config_options(factory)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    unknown = sorted(set(config) - set(options))
    if unknown and not accepts_any:
        raise UsageError(
            f"model '{name}' has no config key {', '.join(unknown)}; its keys: {', '.join(options) or 'none'}"
        )
    effective = {**options, **config}
    limit = Budget.machine() if budget is None else budget
    shapes = _meta_shapes(factory, name, schema, config, limit, source)
    if shapes is not None and expected is not None:
        ckpt_io.check_shapes(shapes, expected, source)
    if meta_only and shapes is not None:
        return None, effective
    model = _call(factory, name, schema, config, limit, source)
    if not isinstance(model, nn.Module) or not hasattr(model, "task_parameters"):
        raise PluginError(f"model plugin '{name}' must return a torch.nn.Module with a task_parameters() method")
    return model, effective


def _too_large(name: str, source: str, exc: TooLarge) -> Exception:
    if source:
        return CheckpointError(f"{source}: corrupt checkpoint (its model_config builds a model '{name}' of {exc})")
    return UsageError(f"model '{name}': the config builds a model of {exc}, too large for this machine")


def _call(factory, name: str, schema: Schema, config: dict, limit: Budget, source: str) -> nn.Module:
    try:
        with bounded(limit):
            return factory(schema, **config)
    except TooLarge as exc:
        raise _too_large(name, source, exc) from None
    except torch.OutOfMemoryError as exc:  # built on a GPU too small for it
        raise OutOfMemory.from_torch(exc) from exc
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"model '{name}' rejected its config: {exc}") from exc
    except RuntimeError as exc:
        if "alloc" not in str(exc).lower():
            raise
        raise UsageError(f"model '{name}' rejected its config: {exc}") from exc
    except ImportError as exc:  # a factory that imports its library lazily, when it is called
        raise PluginError(f"model plugin '{name}' failed to load: {type(exc).__name__}: {exc}") from exc


class _SkipMetaFills(TorchFunctionMode):
    """Inside the meta build, the initialisers' in-place fills of a meta tensor (``normal_`` and the
    other random fills, the clamp and erfinv of a truncated normal) return it as it is: they change
    no shape, and torch runs them on the meta device through Python decompositions whose first use
    imports torch._dynamo, which took seconds of every command's start (2.9 s of 2.9 s building the
    built-in mmoe on the meta device, measured with cProfile on this 2-core machine)."""

    FILLS = frozenset(
        {
            "normal_",
            "exponential_",
            "log_normal_",
            "geometric_",
            "cauchy_",
            "erfinv_",
            "clamp_",
            "clamp_min_",
            "clamp_max_",
        }
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
        if getattr(func, "__name__", "") in self.FILLS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def _meta_shapes(factory, name: str, schema: Schema, config: dict, limit: Budget, source: str):
    """The shapes of the model's state built on the meta device, or None where the plugin cannot
    be built there (its random generators are left as they were: a plugin's init stays seeded)."""
    rng = (torch.random.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        with torch.device("meta"), _SkipMetaFills():
            model = _call(factory, name, schema, config, limit, source)
        if not isinstance(model, nn.Module):
            return None
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except (CheckpointError, UsageError) as exc:
        if isinstance(exc.__cause__, (TypeError, ValueError, RuntimeError)) and not isinstance(exc, CheckpointError):
            return None  # maybe only the meta device's doing: the real build says
        raise
    except Exception:
        return None
    finally:
        torch.random.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])


@dataclass
class ParamSplit:
    """The model's trainable parameters: shared (in a fixed order) and each task's own."""

    shared_names: list[str]
    shared: list[nn.Parameter]
    tasks: dict[str, list[nn.Parameter]]
    task_names: dict[str, list[str]]
    # Set by ``taskgrad.flatten_shared``: one P-vector whose slices the shared parameters are.
    flat: nn.Parameter | None = None
    # Shared embedding tables trained row-sparse (``tables.separate``, ``train --embeddings
    # coordinate|sum``): taken out of ``shared``; their per-task gradients are the touched rows only.
    tables: list[nn.Parameter] = field(default_factory=list)
    table_names: list[str] = field(default_factory=list)

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


def check_checkpoint(path: str | Path, plugin_paths: list[str] | None = None) -> ckpt_io.Metadata:
    """Validate a checkpoint without reading its weights: its metadata (``read_checked``), and its
    model built on the meta device within the budget its stored shapes allow and compared with
    them. → the validated metadata."""
    meta = ckpt_io.read_checked(path)
    shapes = ckpt_io.stored_shapes(path)
    build(meta.model, meta.schema, meta.model_config, plugin_paths, Budget.stored(shapes), shapes, str(path), True)
    return meta


def from_checkpoint(path: str | Path, plugin_paths: list[str] | None = None, device: torch.device | str = "cpu"):
    """Load a checkpoint and its model: → (checkpoint, model on ``device``, parameter split).

    The metadata is validated and the model checked on the meta device against the stored shapes
    before anything is allocated (``build``)."""
    ckpt = ckpt_io.load(path)
    shapes = {k: tuple(v.shape) for k, v in ckpt.state.items()}
    model, _ = build(ckpt.model, ckpt.schema, ckpt.model_config, plugin_paths, Budget.stored(shapes), shapes, str(path))
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
