"""Large vocabularies in a checkpoint: stored as tensors, not in its JSON header.

A ``vocab`` or ``vocab-file`` encoding keeps its values in the schema. Up to INLINE_VOCAB values they
sit in the header's schema JSON (readable with any safetensors tool); beyond, the header would grow
by ~7 bytes or more per value and safetensors caps it at 100 MB, so the values are written as
tensors and the feature records only their number (``vocab_stored``). Reading a checkpoint puts
them back (an Arrow array); checkpoints written before this existed hold every vocabulary inline.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors import SafetensorError, safe_open

from cogradctl.encodings import vocab_array
from cogradctl.errors import CheckpointError
from cogradctl.schema import Schema, check_vocab

VOCAB_PREFIX = "vocab."
INLINE_VOCAB = 10_000  # larger vocabularies are stored as tensors


def vocab_tensors(schema: Schema) -> tuple[Schema, dict[str, torch.Tensor]]:
    """Vocabularies of more than INLINE_VOCAB values leave the JSON header for tensors: → (the schema
    to write, its feature noting each such vocabulary's size in ``vocab_stored``; the tensors).
    ``VOCAB_PREFIX + name`` holds integer values (int64); string values are UTF-8 bytes (uint8,
    ``….bytes``) cut at ``….offsets`` (int64, one more than the values)."""
    tensors, features = {}, []
    for f in schema.features:
        if f.kind != "categorical" or len(f.vocab) <= INLINE_VOCAB:
            features.append(f)
            continue
        values = vocab_array(f)
        key = VOCAB_PREFIX + f.name
        if f.value_type == "int":
            tensors[key] = torch.from_numpy(values.to_numpy(zero_copy_only=False).astype(np.int64))
        else:
            values = values.cast(pa.large_string())
            offsets = np.frombuffer(values.buffers()[1], np.int64)[values.offset : values.offset + len(values) + 1]
            data = values.buffers()[2]
            raw = np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]] if data is not None else np.zeros(0, np.uint8)
            tensors[key + ".bytes"] = torch.from_numpy(raw.copy())
            tensors[key + ".offsets"] = torch.from_numpy((offsets - offsets[0]).copy())
        features.append(replace(f, vocab=[], vocab_stored=len(values)))
    return Schema(features, schema.tasks), tensors


def _read_vocab(f, get, path) -> pa.Array:
    """A vocabulary stored as tensors (``vocab_tensors``), back as an Arrow array of its ``vocab_stored`` values."""
    key = VOCAB_PREFIX + f.name
    if f.value_type == "int":
        values = pa.array(get(key).numpy())
    else:
        data, offsets = get(key + ".bytes").numpy(), get(key + ".offsets").numpy()
        if (
            len(offsets) != f.vocab_stored + 1
            or offsets[0] != 0
            or offsets[-1] != len(data)
            or (np.diff(offsets) < 0).any()
        ):
            raise ValueError(f"vocabulary of '{f.name}': offsets do not fit its bytes")
        values = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data))
        values = values.cast(pa.string())
    if len(values) != f.vocab_stored:
        raise ValueError(f"vocabulary of '{f.name}': {len(values)} values stored, the schema says {f.vocab_stored}")
    return values


def with_vocab(schema: Schema, path: str | Path) -> Schema:
    """The schema with every vocabulary that is stored as tensors read back (validated)."""
    if not any(x.vocab_stored is not None for x in schema.features):
        return schema
    features = []
    try:
        with safe_open(path, framework="pt") as handle:
            for x in schema.features:
                if x.vocab_stored is not None:
                    x = replace(x, vocab=_read_vocab(x, handle.get_tensor, path), vocab_stored=None)
                    check_vocab(x, f"feature '{x.name}'")
                features.append(x)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint (schema: {str(exc)[:200]})") from exc
    return Schema(features, schema.tasks)
