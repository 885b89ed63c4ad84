"""A team's state dict: read it from a file safely, and map its key names onto a model plugin's.

Reading (``read``): ``.pt``/``.pth``/``.bin`` files through ``torch.load(weights_only=True,
map_location="cpu")``, which refuses to run pickled code (a pickled whole module is refused with
what to save instead); ``.safetensors`` files as they are. A trainer checkpoint that nests the
state dict under a key (``{"state_dict": …, "epoch": 3}``) is read with ``weights_key``.

Mapping (``map_keys``), for each source key in turn: left out if it matches an ``--ignore-keys``
glob (trainer extras such as uncertainty-weighting parameters: not model weights); DDP's/
DataParallel's ``module.`` prefix stripped when every kept key has it (and no rename rule names
it); then the first ``--rename OLD=NEW`` rule whose OLD prefixes the key replaces it by NEW (OLD
may be empty: add a prefix; NEW may be empty: drop one). The result must match the model's
state-dict keys one to one with the same shapes; every mismatch is listed (the first few, with a
count), with a hint when a prefix explains them.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from cogradctl.errors import CheckpointError, UsageError

PT_SUFFIXES = (".pt", ".pth", ".bin")
SUFFIXES = (*PT_SUFFIXES, ".safetensors")
DDP_PREFIX = "module."
NESTED_NAMES = ("state_dict", "model_state_dict", "model", "net", "module", "weights")  # tried first in hints
SHOWN = 3  # mismatches of each kind listed in one error line


@dataclass
class Source:
    """The tensors of a weights file and where they came from."""

    path: Path
    format: str  # "pt" or "safetensors"
    size: int
    sha256: str
    tensors: dict[str, torch.Tensor]
    weights_key: str | None = None

    def provenance(self) -> dict:
        """The history's record of the file: it is never read again after the import."""
        return {
            "file": str(self.path),
            "resolved": str(self.path.resolve()),
            "format": self.format,
            "size": self.size,
            "sha256": self.sha256,
            "weights_key": self.weights_key,
            "tensors": len(self.tensors),
        }


def read(path: Path, weights_key: str | None = None) -> Source:
    """The state dict in ``path`` (CPU tensors), its size and sha256; a CheckpointError naming the problem."""
    where = f"--weights {path}"
    if not path.exists():
        raise CheckpointError(f"{where}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{where}: not a file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(
            f"{where}: expected a .pt, .pth or .bin file (torch.save of a state dict) or a .safetensors file"
        )
    size, sha256 = digest(path)
    if suffix == ".safetensors":
        if weights_key is not None:
            raise UsageError(f"--weights-key {weights_key}: a .safetensors file is flat; leave --weights-key out")
        tensors, fmt = _read_safetensors(path, where), "safetensors"
    else:
        tensors, fmt = _state_dict(_read_pt(path, where), where, weights_key), "pt"
    if not tensors:
        raise CheckpointError(f"{where}: holds no tensors")
    return Source(path, fmt, size, sha256, tensors, weights_key)


def digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of a file, read in 1 MiB blocks."""
    h, size = hashlib.sha256(), 0
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                size += len(block)
    except OSError as exc:
        raise CheckpointError(f"--weights {path}: cannot be read ({exc.strerror or exc})") from exc
    return size, h.hexdigest()


def _read_pt(path: Path, where: str):
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # a class or function the file would import
        if found:
            raise CheckpointError(
                f"{where}: holds a pickled module or other Python object ({found.group(1)}), not a state dict of "
                "tensors: save model.state_dict() and import that"
            ) from exc
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        reason = detail.group(1).strip() if detail else _first_line(exc)
        raise CheckpointError(f"{where}: not a readable PyTorch file ({reason})") from exc
    except Exception as exc:  # a truncated zip, random bytes, an empty file: torch raises many kinds
        raise CheckpointError(f"{where}: not a readable PyTorch file ({_first_line(exc)})") from exc


def _read_safetensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a readable safetensors file ({_first_line(exc)})") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _state_dict(obj, where: str, weights_key: str | None) -> dict[str, torch.Tensor]:
    """The dict of tensors in a loaded ``.pt`` object (under ``weights_key`` if given)."""
    if weights_key is not None:
        if not isinstance(obj, Mapping) or weights_key not in obj:
            keys = ", ".join(map(str, list(obj)[:10])) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{where}: no key '{weights_key}' at the top level (it holds: {keys})")
        obj = obj[weights_key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{where}: holds a {type(obj).__name__}, not a state dict (a dict of tensors): save model.state_dict()"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if bad:
        nested = [k for k, v in obj.items() if _is_tensor_dict(v)]
        nested.sort(key=lambda k: (k not in NESTED_NAMES, NESTED_NAMES.index(k) if k in NESTED_NAMES else 0))
        first = obj[bad[0]]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        hint = (
            f"; the state dict looks nested: pass --weights-key {nested[0]}"
            if nested and weights_key is None
            else "; a state dict maps parameter names to tensors"
        )
        shown = repr(first) if isinstance(first, (int, float, str, bool)) and len(repr(first)) < 40 else ""
        what = f"{type(first).__name__} {shown}".strip()
        raise CheckpointError(f"{where}: '{bad[0]}' holds {what}, not a tensor{more}{hint}")
    return dict(obj)


def _is_tensor_dict(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(t, torch.Tensor) for t in value.values())


# ---------------------------------------------------------------------------- key mapping


@dataclass
class KeyMap:
    """How the source's keys became the model's: the rules, and the result."""

    rename: list[tuple[str, str]]
    ignore: list[str]
    strip_module: bool
    mapping: dict[str, str]  # model key → source key, in the model's order
    ignored: list[str] = field(default_factory=list)  # source keys left out by --ignore-keys

    def record(self) -> dict:
        """The history's record: the rules, and every key whose name changed (what export inverts)."""
        return {
            "strip_module": self.strip_module,
            "rename": [[old, new] for old, new in self.rename],
            "ignore": list(self.ignore),
            "ignored": list(self.ignored),
            "renamed": {m: s for m, s in self.mapping.items() if m != s},
        }


def parse_rename(specs: list[str]) -> list[tuple[str, str]]:
    """``["net.=", "=backbone."]`` → ``[("net.", ""), ("", "backbone.")]``: OLD=NEW key prefixes."""
    rules = []
    for spec in specs:
        old, sep, new = spec.partition("=")
        if not sep or (not old and not new) or old == new:
            raise UsageError(
                f"--rename {spec!r}: expected OLD=NEW key prefixes, e.g. 'backbone.=net.' "
                "('=net.' adds a prefix, 'net.=' drops one)"
            )
        rules.append((old, new))
    return rules


def map_keys(
    source: dict[str, torch.Tensor],
    model: dict[str, torch.Tensor],
    rename: list[tuple[str, str]],
    ignore: list[str],
    where: str,
    plugin: str,
) -> KeyMap:
    """Map ``source``'s keys onto ``model``'s (its ``state_dict()``); a CheckpointError listing mismatches."""
    strip = not any(old.startswith(DDP_PREFIX) for old, _ in rename) and not any(
        k.startswith(DDP_PREFIX) for k in model
    )

    def stripped(key: str) -> str:
        return key[len(DDP_PREFIX) :] if key.startswith(DDP_PREFIX) else key

    ignored = [k for k in source if any(fnmatchcase(k, p) or fnmatchcase(stripped(k), p) for p in ignore)]
    kept = [k for k in source if k not in set(ignored)]
    strip = strip and bool(kept) and all(k.startswith(DDP_PREFIX) for k in kept)
    targets: dict[str, str] = {}  # model-side name → source key
    for key in kept:
        name = _renamed(stripped(key) if strip else key, rename)
        if name in targets:
            raise CheckpointError(f"{where}: keys '{targets[name]}' and '{key}' both map to '{name}'; check --rename")
        targets[name] = key
    missing = [n for n in model if n not in targets]
    unexpected = [n for n in targets if n not in model]
    differ = []
    for name in (n for n in model if n in targets):
        have, want = source[targets[name]], model[name]
        if tuple(have.shape) != tuple(want.shape):
            differ.append(f"{_as(targets[name], name)} {tuple(have.shape)} vs the model's {tuple(want.shape)}")
        elif have.is_floating_point() != want.is_floating_point():
            differ.append(f"{_as(targets[name], name)} {have.dtype} vs the model's {want.dtype}")
    if missing or unexpected or differ:
        parts = [
            _listed(f"{len(missing)} missing from the file", missing),
            _listed(f"{len(unexpected)} not in the model", [_as(targets[n], n) for n in unexpected]),
            _listed(f"{len(differ)} of another shape or kind", differ),
        ]
        hint = _hint(missing, unexpected)
        raise CheckpointError(
            f"{where}: the tensors do not match model plugin '{plugin}': "
            f"{'; '.join(p for p in parts if p)}{hint}; nothing written"
        )
    mapping = {name: targets[name] for name in model}
    return KeyMap(rename, list(ignore), strip, mapping, ignored)


def _listed(title: str, items: list[str]) -> str:
    """``"3 missing: a, b, c"``, the first few items only, with a count of the rest."""
    if not items:
        return ""
    more = f", and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"{title}: {', '.join(items[:SHOWN])}{more}"


def _renamed(key: str, rules: list[tuple[str, str]]) -> str:
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _as(source_key: str, name: str) -> str:
    return source_key if source_key == name else f"{source_key} (as {name})"


def _hint(missing: list[str], unexpected: list[str]) -> str:
    """A ``--rename`` that would explain every mismatch by one prefix, or the --ignore-keys advice."""
    if missing and unexpected:
        m0, u0 = missing[0], unexpected[0]
        if m0.endswith(u0) and m0 != u0:
            p = m0[: -len(u0)]
            if all(p + u in missing for u in unexpected):
                return f" (every model key has the prefix '{p}' the file's keys lack: try --rename '={p}')"
        if u0.endswith(m0) and m0 != u0:
            p = u0[: -len(m0)]
            if all(u.startswith(p) and u[len(p) :] in missing for u in unexpected):
                return f" (the file's keys have a prefix '{p}' the model's lack: try --rename '{p}=')"
    if unexpected and not missing:
        return " (trainer extras, not model weights? leave them out with --ignore-keys 'PATTERN')"
    return ""
