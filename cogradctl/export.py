"""Export a checkpoint's model weights as a plain state dict for the team's own code.

The model's ``state_dict`` only (parameters and persistent buffers; no optimizer, method or RNG
state, no cogradctl metadata), with the team's original key names: the checkpoint's ``import``
history entry records every key whose name the import changed (``mapping.renamed``, model key →
source key), and export applies it backwards. Keys that the import left out (``--ignore-keys``:
trainer extras such as uncertainty weights) are not model weights and are not exported. A
checkpoint made by ``init`` (no import) exports the plugin's own key names.

Formats, by the suffix of ``out``: ``.pt``/``.pth``/``.bin``, ``torch.save`` of a plain dict of
tensors (``torch.load(weights_only=True)`` reads it); ``.safetensors``, a plain safetensors file
with no metadata. Tensors are CPU, contiguous and unshared. Written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl.atomic_files import atomic_write_bytes
from cogradctl.errors import CheckpointError, UsageError

FORMATS = {".pt": "pt", ".pth": "pt", ".bin": "pt", ".safetensors": "safetensors"}


def import_entry(ckpt: ckpt_io.Checkpoint) -> dict | None:
    """The latest ``import`` entry of the checkpoint's history (None for a checkpoint made by init)."""
    return next((h for h in reversed(ckpt.history) if h.get("run") == "import"), None)


def original_names(ckpt: ckpt_io.Checkpoint, source: str) -> dict[str, str]:
    """Model key → the key to export it under (the team's name for an imported model)."""
    entry = import_entry(ckpt)
    renamed = (entry or {}).get("mapping", {}).get("renamed", {})
    if not isinstance(renamed, dict):
        raise CheckpointError(f"{source}: the import entry's key mapping is not a mapping")
    names = {k: renamed.get(k, k) for k in ckpt.state}
    seen: dict[str, str] = {}
    for k, name in names.items():
        if name in seen:
            raise CheckpointError(f"{source}: tensors {seen[name]} and {k} would both be exported as {name}")
        seen[name] = k
    return names


def exported_state(ckpt: ckpt_io.Checkpoint, source: str) -> dict[str, torch.Tensor]:
    """The tensors to write: the model's state under the exported names (CPU, contiguous, cloned)."""
    names = original_names(ckpt, source)
    return {names[k]: v.detach().to("cpu").contiguous().clone() for k, v in ckpt.state.items()}


def export(checkpoint: Path, out: Path, overwrite: bool = False) -> dict:
    """Write ``out`` from ``checkpoint``; → a summary (the command's ``--json`` document)."""
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"--out {out}: expected a .pt, .pth, .bin or .safetensors file name")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give the file to write, e.g. {out / 'model.pt'}")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out}: file exists; pass --overwrite to replace it")
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise UsageError(f"--out {out}: is the checkpoint itself; write elsewhere")
    ckpt = ckpt_io.load(checkpoint)
    state = exported_state(ckpt, str(checkpoint))
    if fmt == "pt":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    else:
        from safetensors.torch import save

        data = save(state)
    atomic_write_bytes(out, data)
    entry = import_entry(ckpt)
    return {
        "checkpoint": str(checkpoint),
        "out": str(out),
        "format": fmt,
        "model": ckpt.model,
        "tensors": len(state),
        "elements": sum(v.numel() for v in state.values()),
        "keys": "original" if entry else "plugin",
        "renamed": sum(1 for k, v in original_names(ckpt, str(checkpoint)).items() if k != v),
        "imported_from": (entry or {}).get("weights", {}).get("file"),
    }
