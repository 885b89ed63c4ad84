"""What a checkpoint saves to resume a run exactly, and how it is put back.

``optimizer_tensors`` turns the optimizer's state into named tensors (``optim.<key>.<parameter>``),
``restore`` puts them back with the method's state, the RNG state and the fp16 loss scale, and
``previous_state`` decides from ``--out``'s contents whether a run starts afresh or resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl.errors import UsageError
from cogradctl.models import ParamSplit
from cogradctl.taskgrad import unflatten_shared
from cogradctl.train.batches import data_shards
from cogradctl.train.config import OUTPUTS, TrainConfig


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: list[str | None], split: ParamSplit | None = None
) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as ``optim.<key>.<parameter name>`` tensors; the flat
    shared parameter's (name None) cut into one entry per shared parameter, so a checkpoint reads
    the same with or without ``flatten_shared``."""
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
                    out[f"optim.{key}.{shared_name}"] = piece.clone()
            else:
                out[f"optim.{key}.{name}"] = value.clone()
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
            optimizer.state[param] = {k: (v.to(device) if k != "step" else v) for k, v in entries.items()}
    method_state = {k[len("method.") :]: v for k, v in extra.items() if k.startswith("method.")}
    if method_state:
        method.load_state_dict(method_state)
    if "rng.torch" in extra:
        torch.set_rng_state(extra["rng.torch"])
    if "rng.cuda" in extra and device.type == "cuda":
        torch.cuda.set_rng_state(extra["rng.cuda"], device)
    if scaler is not None and "scaler.scale" in extra:
        scaler.scale, scaler.good_steps = float(extra["scaler.scale"][0]), int(extra["scaler.scale"][1])


def previous_state(cfg: TrainConfig, out: Path, world: int = 1) -> dict | None:
    """The saved position of an unfinished run in ``out`` to resume from, or None to start afresh
    (reads only)."""
    last = out / "last.safetensors"
    existing = [n for n in OUTPUTS if (out / n).exists()]
    state = ckpt_io.load(last).training_state if last.exists() else None
    if cfg.overwrite:
        if cfg.resume:
            raise UsageError("--resume and --overwrite contradict each other")
        return None  # its outputs are removed once the inputs have been checked
    if state is None:
        if cfg.resume:
            raise UsageError(f"--resume: {out} holds no run to resume")
        if existing:
            raise UsageError(
                f"--out {out}: already holds files ({', '.join(existing)}); choose another directory or pass --overwrite"
            )
        return None
    if state.get("finished"):
        if cfg.resume:
            raise UsageError(
                f"--resume: the run in {out} has finished (step {state['step']}); pass --overwrite to start again"
            )
        raise UsageError(f"--out {out}: already holds a finished run; choose another directory or pass --overwrite")
    saved = state.get("config", {})
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
    return state
