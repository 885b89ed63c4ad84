"""What a checkpoint saves to resume a run exactly, and how it is put back.

``optimizer_tensors`` turns the optimizer's state into named tensors (``optim.<key>.<parameter>``),
``restore`` puts them back with the method's state, the RNG state and the fp16 loss scale, and
``previous_state`` decides from ``--out``'s contents whether a run starts afresh or resumes, and
``check_training_state``/``check_resume_tensors`` check everything a saved state holds before any
of it is used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl.errors import CheckpointError, UsageError
from cogradctl.models import ParamSplit
from cogradctl.taskgrad import unflatten_shared
from cogradctl.train.batches import data_shards
from cogradctl.train.config import OUTPUTS, TrainConfig


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: list[str | None], split: ParamSplit | None = None
) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as ``optim.<key>.<parameter name>`` tensors; the flat
    shared parameter's (name None) cut into one entry per shared parameter, so a checkpoint reads
    the same with or without ``flatten_shared``. The tensors are the optimizer's own (or views of
    them), not copies: a checkpoint of large tables is written from them directly, between steps."""
    out = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params):
        for key, value in optimizer.state.get(param, {}).items():
            value = torch.as_tensor(value).detach()
            if name is None:  # a P-vector cut by parameter; a scalar (Adam's step count) repeated
                pieces = (
                    unflatten_shared(split, value)
                    if value.numel() == split.flat.numel()
                    else dict.fromkeys(split.shared_names, value)
                )
                for shared_name, piece in pieces.items():
                    out[f"optim.{key}.{shared_name}"] = piece
            else:
                out[f"optim.{key}.{name}"] = value
    return out


def _saved_state(extra: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix, suffix = "optim.", f".{name}"
    return {
        k[len(prefix) : -len(suffix)]: v
        for k, v in extra.items()
        if k.startswith(prefix)
        and k.endswith(suffix)
        and k[len(prefix) : -len(suffix)]
        and "." not in k[len(prefix) : -len(suffix)]
    }


def _placed(key: str, value: torch.Tensor, param, optimizer, device) -> torch.Tensor:
    """Where ``Optimizer.load_state_dict`` would put a saved state tensor: the step count stays on
    the CPU, except for a fused or capturable group, whose kernels read it on the parameter's
    device as float32 (the fused CUDA Adam refuses a CPU step: a resumed GPU run failed so)."""
    if key != "step":
        return value.to(device)
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    if group.get("fused") or group.get("capturable"):
        return value.to(dtype=torch.float32, device=param.device)
    return value


def restore(
    extra: dict[str, torch.Tensor],
    optimizer,
    names: list[str | None],
    method,
    scaler,
    device,
    split: ParamSplit | None = None,
) -> None:
    """Put back the optimizer, method, RNG and loss-scale state saved by a previous run."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params):
        if name is None:  # the flat shared parameter: its state, joined from the shared parameters' entries
            parts = [_saved_state(extra, n) for n in split.shared_names]
            keys = set(parts[0]) if all(parts) and all(set(p) == set(parts[0]) for p in parts) else set()
            entries = {
                k: parts[0][k] if parts[0][k].numel() == 1 else torch.cat([p[k].reshape(-1) for p in parts])
                for k in keys
            }
        else:
            entries = _saved_state(extra, name)
        if entries:
            optimizer.state[param] = {k: _placed(k, v, param, optimizer, device) for k, v in entries.items()}
    method_state = {k[len("method.") :]: v for k, v in extra.items() if k.startswith("method.")}
    if method_state:
        method.load_state_dict(method_state)
    if "rng.torch" in extra:
        torch.set_rng_state(extra["rng.torch"])
    if "rng.cuda" in extra and device.type == "cuda":
        torch.cuda.set_rng_state(extra["rng.cuda"], device)
    if scaler is not None and "scaler.scale" in extra:
        scaler.scale, scaler.good_steps = float(extra["scaler.scale"][0]), int(extra["scaler.scale"][1])


def check_out(cfg: TrainConfig, out: Path) -> None:
    """``--out`` is a directory (or not there yet), and the input checkpoint is none of the files a
    run writes in it: ``--overwrite`` removes them and every run rewrites them, and the input is
    never touched (refused rather than copied aside: a silent copy would train from a file the run
    then deletes, and the history's ``from`` would name a file that no longer holds it)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    checkpoint = Path(cfg.checkpoint).resolve()
    for name in (*OUTPUTS, "config.toml"):
        if checkpoint == out.resolve() / name:
            raise UsageError(
                f"--checkpoint {cfg.checkpoint} is {out / name}, a file this run writes in --out {out}; "
                "copy it out of --out first, or choose another --out"
            )


def previous_state(cfg: TrainConfig, out: Path, world: int = 1) -> dict | None:
    """The saved position of an unfinished run in ``out`` to resume from, or None to start afresh
    (reads only)."""
    last = out / "last.safetensors"
    existing = [n for n in OUTPUTS if (out / n).exists()]
    if cfg.overwrite:
        if cfg.resume:
            raise UsageError("--resume and --overwrite contradict each other")
        return None  # its outputs are removed once the inputs have been checked (damaged or not)
    state = ckpt_io.load(last).training_state if last.exists() else None
    if state is not None:
        check_training_state(state, last)
    if state is None:
        if existing:  # files, but no saved state: a run killed before its first save (older versions)
            raise UsageError(
                f"--out {out}: holds {', '.join(existing)} but no saved run state (last.safetensors with a "
                "training_state; a run stopped before its first save, or other files): nothing to resume; "
                "choose another directory or pass --overwrite"
            )
        if cfg.resume:
            raise UsageError(f"--resume: {out} holds no run to resume")
        return None
    if state.get("finished"):
        if cfg.resume:
            raise UsageError(
                f"--resume: the run in {out} has finished (step {state['step']}); pass --overwrite to start again"
            )
        raise UsageError(f"--out {out}: already holds a finished run; choose another directory or pass --overwrite")
    saved = {"embeddings": "dense", **state.get("config", {})}  # runs saved before --embeddings were dense
    now = cfg.identity(world, data_shards(cfg, state, world))
    changed = [k for k, v in now.items() if json.dumps(saved.get(k)) != json.dumps(v)]
    if changed:
        listed = ", ".join(f"{k} ({saved.get(k)!r} → {now[k]!r})" for k in changed)
        hint = ""
        if "global_batch" in changed and saved.get("global_batch", 0) % world == 0:
            hint = f" (--batch-size is per process: with {world} process(es), pass --batch-size {saved['global_batch'] // world})"
        raise UsageError(
            f"--out {out} holds an unfinished run with other settings: {listed}{hint}; rerun it as it was, or pass --overwrite"
        )
    check_position(state, cfg, last)
    if state.get("initial"):
        return None  # the same run, stopped before its first step: start it again
    return state


# ---------------------------------------------------------------------------- checking a saved state
# A resume state is read from a file a user can damage: every field and tensor is checked here, so
# that a bad one is a one-line CheckpointError naming it, not a crash inside the optimizer (a
# wrong-shaped exp_avg reaches the fused Adam kernel and aborts the process) or a silent restart.

_COUNTS = ("step", "batch", "best_step", "bad_evals", "skipped")
_FLAGS = ("stopped_early", "finished_steps", "finished", "initial")


def check_training_state(state, path: Path) -> dict:
    """``state`` (a checkpoint's ``training_state``) as ``Progress`` and the loop read it: types and
    ranges of every field they use."""

    def bad(key: str, expected: str):
        value = json.dumps(state.get(key)) if isinstance(state, dict) else json.dumps(state)
        return CheckpointError(
            f"{path}: corrupt resume state: training_state {key} = {value[:60]}: expected {expected}"
        )

    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt resume state: training_state is not a JSON object")
    for key in ("step", "epoch", "batch", "config"):
        if key not in state:
            raise CheckpointError(f"{path}: corrupt resume state: training_state has no {key!r}")
    for key in _COUNTS:
        if key in state and not (_is_int(state[key]) and state[key] >= 0):
            raise bad(key, "an integer ≥ 0")
    for key in ("epoch", "sessions", "total_steps"):  # the last two: states saved since issue #25
        if (key == "epoch" or key in state) and not (_is_int(state[key]) and state[key] >= 1):
            raise bad(key, "an integer ≥ 1")
    for key in _FLAGS:
        if key in state and not isinstance(state[key], bool):
            raise bad(key, "true or false")
    if state.get("evaluated_step") is not None and not (
        _is_int(state["evaluated_step"]) and state["evaluated_step"] >= 0
    ):
        raise bad("evaluated_step", "null or an integer ≥ 0")
    for key in ("best_score", "seconds"):
        if key in state and not (key == "best_score" and state[key] is None or _is_finite(state[key])):
            raise bad(key, "a finite number" + (" or null" if key == "best_score" else ""))
    if state.get("seconds", 0) < 0:
        raise bad("seconds", "a number ≥ 0")
    if not isinstance(state["config"], dict):
        raise bad("config", "a JSON object (the run's settings)")
    for key in ("before", "last_eval", "best_eval"):
        if state.get(key) is not None and not _is_evaluation(state[key]):
            raise bad(key, 'null or an evaluation ({"tasks": {task: {metric: number or null}}})')
    for key in ("batch", "best_step", "evaluated_step", "skipped"):
        if (state.get(key) or 0) > state["step"]:
            raise bad(key, f"at most the step ({state['step']})")
    return state


def check_position(state: dict, cfg: TrainConfig, path: Path) -> None:
    """An unfinished run's position is inside the run its settings describe."""
    if state["epoch"] > cfg.epochs:
        raise CheckpointError(
            f"{path}: corrupt resume state: training_state epoch = {state['epoch']}: expected at most "
            f"{cfg.epochs} (--epochs) for an unfinished run"
        )
    if cfg.max_steps is not None and state["step"] > cfg.max_steps:
        raise CheckpointError(
            f"{path}: corrupt resume state: training_state step = {state['step']}: expected at most "
            f"{cfg.max_steps} (--max-steps) for an unfinished run"
        )


def check_resume_tensors(
    extra: dict[str, torch.Tensor], optimizer, names: list[str | None], method, scaler, device, split, path, taken: int
) -> None:
    """Every saved tensor ``restore`` puts back, against what this run's optimizer, method, RNG and
    loss scaler hold: names, shapes and dtypes; none missing (``taken``: optimizer steps the run has
    taken, after which the shared parameters' optimizer state must be there)."""

    def bad(key: str, what: str):
        return CheckpointError(f"{path}: corrupt resume state: {key}: {what}")

    _check_optimizer_state(extra, optimizer, names, split, taken, bad)
    expected = method.state_dict()
    for key in extra:
        if key.startswith("method.") and key[len("method.") :] not in expected:
            raise bad(key, f"not a state of method {type(method).__name__}")
    for key, want in expected.items():
        if f"method.{key}" not in extra:
            raise bad(f"method.{key}", "missing")
        value = extra[f"method.{key}"]
        shape = tuple(want.shape) if want.numel() or not want.dim() else tuple(value.shape)[: want.dim()]
        _check_tensor(f"method.{key}", value, shape, want.dtype, bad)
    if "rng.torch" not in extra:
        raise bad("rng.torch", "missing")
    _check_tensor("rng.torch", extra["rng.torch"], tuple(torch.get_rng_state().shape), torch.uint8, bad)
    if "rng.cuda" in extra and device.type == "cuda":
        _check_tensor("rng.cuda", extra["rng.cuda"], tuple(torch.cuda.get_rng_state(device).shape), torch.uint8, bad)
    if scaler is not None:
        if "scaler.scale" not in extra:
            raise bad("scaler.scale", "missing (an fp16 run)")
        value = extra["scaler.scale"]
        _check_tensor("scaler.scale", value, (2,), torch.float64, bad)
        if not (math.isfinite(float(value[0])) and float(value[0]) > 0 and float(value[1]) >= 0):
            raise bad("scaler.scale", f"{value.tolist()}, expected [scale > 0, good steps ≥ 0]")


def _check_optimizer_state(extra, optimizer, names, split, taken: int, bad) -> None:
    """The ``optim.<key>.<parameter>`` tensors: known keys of known parameters, shaped like them,
    complete per parameter, and there for every shared parameter once the optimizer has stepped."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    targets = {}  # checkpoint parameter name → (shape, dtype)
    for name, param in zip(names, params):
        if name is None:
            targets.update({n: (p.shape, param.dtype) for n, p in zip(split.shared_names, split.shared)})
        else:
            targets[name] = (param.shape, param.dtype)
    wanted = _optimizer_keys(optimizer)
    found: dict[str, set] = {}
    for key, value in extra.items():
        if key.startswith("optim."):
            kind, _, name = key[len("optim.") :].partition(".")
            if kind not in wanted or name not in targets:
                raise bad(key, f"not a {type(optimizer).__name__} state of a parameter of this model")
            shape, dtype = ((), _scalar_dtype()) if kind == "step" else targets[name]
            _check_tensor(key, value, tuple(shape), dtype, bad)
            if kind == "step" and not (math.isfinite(float(value)) and float(value) >= 0):
                raise bad(key, f"{float(value)}, expected a step count ≥ 0")
            found.setdefault(name, set()).add(kind)
        elif not key.startswith(("method.", "rng.", "scaler.")):
            raise bad(key, "not a resume tensor (optim.*, method.*, rng.*, scaler.*)")
    for name, kinds in found.items():
        if kinds != wanted:
            raise bad(
                f"optim.{sorted(wanted - kinds)[0]}.{name}", "missing (the parameter's other optimizer state is there)"
            )
    shared_steps = {float(extra[f"optim.step.{n}"]) for n in split.shared_names if f"optim.step.{n}" in extra}
    if len(shared_steps) > 1:
        raise bad("optim.step.*", f"the shared parameters' step counts differ ({sorted(shared_steps)})")
    if wanted and taken > 0:
        missing = [n for n in split.shared_names if n not in found]
        if missing:
            raise bad(f"optim.{sorted(wanted)[0]}.{missing[0]}", f"missing after {taken} optimizer step(s)")


def _check_tensor(key: str, value, shape: tuple, dtype: torch.dtype, bad) -> None:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
        got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise bad(key, f"{got}, expected shape {shape} {dtype}")


def _optimizer_keys(optimizer) -> set[str]:
    """The per-parameter state this project's optimizers keep (``make_optimizer``)."""
    if isinstance(optimizer, torch.optim.SGD):
        return {"momentum_buffer"} if optimizer.defaults.get("momentum") else set()
    return {"step", "exp_avg", "exp_avg_sq"}


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_evaluation(v) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("tasks"), dict)
        and all(
            isinstance(m, dict) and all(x is None or isinstance(x, (int, float)) for x in m.values())
            for m in v["tasks"].values()
        )
    )
