"""Checkpoints: one ``.safetensors`` file that describes itself.

Tensors: the model's weights under ``model.<name>`` (later runs may add other prefixes).
``__metadata__`` (strings only; structures are JSON): ``format`` = "cogradctl-checkpoint",
``format_version``, ``cogradctl_version``, ``model`` (plugin name), ``model_config`` (JSON, keys
in the plugin's order), ``schema`` (JSON: features with vocabularies and normalisation statistics,
tasks and their types), ``history`` (JSON list, one entry per init/import/train run: what, method,
steps, seed, data, time; an import's entry also the source weights' digest and key mapping) and,
in a ``train`` output, ``training_state`` (JSON: step, epoch, position in the data, best score,
whether the run finished, its configuration) with the tensors needed to resume exactly under
``optim.<state>.<parameter>``, ``method.<buffer>`` and ``rng.<generator>``.

Loading never unpickles anything. Writing goes to a temporary file in the target's directory,
fsynced and renamed into place, so a reader never sees a half-written checkpoint; the file is
written tensor after tensor from the live tensors (``safetensors_stream``), so a save of several GB
of tables and optimizer state needs no copy of them.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cogradctl import __version__, safetensors_stream
from cogradctl.atomic_files import staged
from cogradctl.errors import CheckpointError
from cogradctl.schema import Schema
from cogradctl.vocab_tensors import VOCAB_PREFIX, vocab_tensors, with_vocab

FORMAT = "cogradctl-checkpoint"
FORMAT_VERSION = "1"
MODEL_PREFIX = "model."
REQUIRED = ("format", "format_version", "model", "model_config", "schema")


@dataclass
class Checkpoint:
    model: str
    model_config: dict
    schema: Schema
    state: dict[str, torch.Tensor]  # the model's state_dict
    history: list[dict] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other tensors, full names
    training_state: dict | None = None  # where an unfinished or finished `train` run stands (resume)


def save(ckpt: Checkpoint, path: str | Path) -> None:
    with staged_checkpoint(Path(path), ckpt):
        pass


def staged_checkpoint(path: Path, ckpt: Checkpoint) -> AbstractContextManager[Path]:
    """``staged_write`` for a checkpoint: its file written tensor after tensor from the caller's
    tensors (``safetensors_stream``), never whole in memory; they must not change meanwhile."""
    tensors, metadata = contents(ckpt)
    return staged(path, lambda f: safetensors_stream.write(f, tensors, metadata))


def contents(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The checkpoint's tensors (the caller's own, not copies) and metadata, as its file holds them.

    ``model_config`` keeps the order of its keys (nested dicts included): a plugin may build its
    inputs from a config dict's order, so sorting the keys would permute its features silently.
    """
    tensors = {MODEL_PREFIX + k: v.detach() for k, v in ckpt.state.items()}
    tensors.update({k: v.detach() for k, v in ckpt.extra.items()})
    schema, vocab = vocab_tensors(ckpt.schema)
    tensors.update(vocab)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cogradctl_version": __version__,
        "model": ckpt.model,
        "model_config": json.dumps(ckpt.model_config),
        "schema": schema.to_json(),
        "history": json.dumps(ckpt.history),
    }
    if ckpt.training_state is not None:
        metadata["training_state"] = json.dumps(ckpt.training_state)
    return tensors, metadata


# What a file that is not a checkpoint starts with, and what to say about it.
FOREIGN_MAGIC = {
    b"PAR1": "a Parquet file, not a checkpoint (Parquet data goes to --data; a checkpoint is the "
    ".safetensors file that init, import or train writes)",
    b"PK\x03\x04": "not a readable safetensors file: a torch.save (zip) file, not a cogradctl checkpoint; "
    "make one from its state dict with 'cogradctl import --weights FILE'",
}


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(_not_a_file(path))
    _refuse_foreign(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    missing = [k for k in REQUIRED if k not in meta]
    if meta.get("format") != FORMAT or missing:
        raise CheckpointError(
            f"{path}: a safetensors file without cogradctl metadata (missing: {', '.join(missing) or 'format'}); "
            "create a checkpoint with 'cogradctl init'"
        )
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta['format_version']}, this cogradctl reads {FORMAT_VERSION}"
        )
    return meta


def _not_a_file(path: Path) -> str:
    """Why ``path`` cannot be read as a checkpoint: missing, or a directory (a run directory: name
    the checkpoints it holds)."""
    if not path.is_dir():
        return f"{path}: no such checkpoint file"
    inside = [str(path / name) for name in ("best.safetensors", "last.safetensors") if (path / name).is_file()]
    if inside:
        return f"{path}: no such checkpoint file (a directory); a run directory's checkpoints: {' or '.join(inside)}"
    return f"{path}: no such checkpoint file (a directory; expected the .safetensors file of init, import or train)"


def _refuse_foreign(path: Path) -> None:
    """A CheckpointError saying what ``path`` is when its first bytes are another format's magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return  # safe_open says why it cannot be read
    for magic, what in FOREIGN_MAGIC.items():
        if head.startswith(magic):
            raise CheckpointError(f"{path}: {what}")


@dataclass
class Metadata:
    """A checkpoint's metadata, parsed and validated (``parse_metadata``)."""

    model: str
    model_config: dict
    schema: Schema
    history: list[dict]
    training_state: dict | None


def parse_metadata(meta: dict[str, str], path: str | Path) -> Metadata:
    """Parse and validate the JSON fields of ``read_metadata``'s result, once, for every command:
    ``model_config`` an object, ``schema`` a valid schema (``Schema.from_json``), ``history`` a
    list of objects, ``training_state`` an object when present. Anything else, or JSON nested
    deeper than Python can parse, is a CheckpointError ("corrupt checkpoint") naming the field."""
    key = "model"
    try:
        if not meta["model"]:
            raise ValueError("no model name")
        key = "model_config"
        config = _json_field(meta, key, dict, "an object")
        key = "schema"
        schema = Schema.from_json(meta["schema"])
        key = "history"
        history = _json_field(meta, key, list, "a list", "[]")
        if not all(isinstance(h, dict) for h in history):
            raise ValueError("expected a list of objects")
        key = "training_state"
        state = _json_field(meta, key, dict, "an object") if key in meta else None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{path}: corrupt checkpoint ({key}: {_short(reason)})") from None
    return Metadata(meta["model"], config, schema, history, state)


def _json_field(meta: dict[str, str], key: str, kind: type, what: str, default: str | None = None):
    value = json.loads(meta[key] if default is None else meta.get(key, default))
    if not isinstance(value, kind):
        raise ValueError(f"expected {what}, got {type(value).__name__}")
    return value


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_checked(path: str | Path) -> Metadata:
    """The validated metadata of the checkpoint at ``path``, without reading its weights (a
    vocabulary stored as tensors is read)."""
    meta = parse_metadata(read_metadata(path), path)
    return replace(meta, schema=with_vocab(meta.schema, path))


def load(path: str | Path) -> Checkpoint:
    meta = parse_metadata(read_metadata(path), path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from exc
    state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    extra = {k: v for k, v in tensors.items() if not k.startswith((MODEL_PREFIX, VOCAB_PREFIX))}
    schema = with_vocab(meta.schema, path)
    return Checkpoint(meta.model, meta.model_config, schema, state, meta.history, extra, meta.training_state)


def load_part(path: str | Path, weights: bool) -> dict[str, torch.Tensor]:
    """Part of a checkpoint's tensors: the model's weights (names without ``model.``), or with
    ``weights=False`` the others a ``train`` checkpoint holds to resume (``optim.*``, ``method.*``,
    ``rng.*``, …), read into memory of their own, not mapped (``safetensors_stream.read``). A resumed
    run loads the weights into its model, lets them go, then reads the rest: it never holds the
    whole checkpoint beside its model, nor the file's pages."""
    try:
        with safe_open(path, framework="pt") as f:  # the library validates the header and offsets
            f.keys()
        tensors = safetensors_stream.read(path, lambda k: k.startswith(MODEL_PREFIX) == weights)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from exc
    if weights:
        return {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items()}
    return {k: v for k, v in tensors.items() if not k.startswith(VOCAB_PREFIX)}


def stored_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The shapes of the model weights stored in ``path`` (names without ``model.``), from the
    safetensors header alone: nothing is read or allocated."""
    try:
        with safe_open(path, framework="pt") as f:
            return {
                k[len(MODEL_PREFIX) :]: tuple(f.get_slice(k).get_shape())
                for k in f.keys()
                if k.startswith(MODEL_PREFIX)
            }
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from exc


def check_shapes(own: dict[str, tuple], stored: dict[str, tuple], source: str) -> None:
    """Raise a CheckpointError naming every tensor of ``own`` (name → shape) that ``stored``
    (name → shape) lacks, holds in another shape, or holds beyond it."""
    problems = []
    for name, shape in own.items():
        if name not in stored:
            problems.append(f"{name} missing")
        elif tuple(stored[name]) != tuple(shape):
            problems.append(f"{name} has shape {tuple(stored[name])}, the model expects {tuple(shape)}")
    problems += [f"{name} unexpected" for name in stored if name not in own]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{source}: the weights do not fit the model plugin: {shown}")


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, naming every tensor that is missing, unexpected or of another shape."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_shapes(own, {k: tuple(v.shape) for k, v in state.items()}, source)
    module.load_state_dict(state)
