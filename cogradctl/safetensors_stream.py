"""A ``.safetensors`` file written tensor after tensor, from the live tensors.

The safetensors library has no streaming writer: ``safetensors.torch.save`` returns the whole file
as one ``bytes`` object, and ``save_file`` too builds it in memory before writing; with the tables
of a ranking model and their Adam moments (several GB) a checkpoint so needed one or two more
copies of the state for the length of a save (issue #24). The format is small enough to write
here, byte for byte as the library writes it (tests/test_embeddings_ckpt.py checks this against
``safetensors.torch.save``):

- 8 bytes: N, the header's length, a little-endian unsigned 64-bit integer;
- N bytes: the header, compact UTF-8 JSON: ``__metadata__`` (a string → string map, when given)
  first, then every tensor's ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the
  data that follows), padded with spaces to a multiple of 8 bytes;
- the tensors' bytes (little-endian, C order), in the header's order: by dtype, the widest first
  (the library's order of its dtype enum, descending), then by name.

One difference: the library writes ``__metadata__``'s keys in its hash map's order, which changes
from process to process; here they keep the order given. Any safetensors reader reads both alike.

Nothing is copied whole: a contiguous CPU tensor is written from its own memory; another (a GPU
tensor, a strided view) is copied ``CHUNK`` bytes at a time. The caller must not change the tensors
while they are written (cogradctl saves between steps, on the main thread).
"""

from __future__ import annotations

import json
import sys
from typing import BinaryIO

import torch

# The library's dtype enum, in its order (a file holds the higher ones first), with torch's dtypes.
DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
    "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
    "I16": torch.int16,
    "U16": getattr(torch, "uint16", None),
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": getattr(torch, "uint32", None),
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": getattr(torch, "uint64", None),
}
NAMES = {dtype: name for name, dtype in DTYPES.items() if dtype is not None}
RANK = {name: i for i, name in enumerate(DTYPES)}
CHUNK = 64 * 2**20  # bytes copied at a time from a tensor that is not a contiguous CPU tensor


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[bytes, list[str]]:
    """The file's first 8 + N bytes, and the tensors' names in the order their bytes follow."""
    for name, tensor in tensors.items():
        if tensor.dtype not in NAMES or tensor.layout != torch.strided:
            raise ValueError(f"tensor {name}: {tensor.dtype} {tensor.layout} cannot be saved as safetensors")
    order = sorted(tensors, key=lambda name: (-RANK[NAMES[tensors[name].dtype]], name))
    entries: dict = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata: keys and values must be strings")
        entries["__metadata__"] = metadata
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def write(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (name → tensor, any device) and ``metadata`` to ``f`` as a safetensors
    file; → the bytes written."""
    if sys.byteorder != "little":
        raise NotImplementedError("writing safetensors on a big-endian machine")
    head, order = header(tensors, metadata)
    f.write(head)
    written = len(head)
    for name in order:
        tensor = tensors[name].detach()
        if tensor.numel() == 0:
            continue
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            f.write(_bytes(tensor))
            written += tensor.numel() * tensor.element_size()
            continue
        flat = tensor.reshape(-1)  # a copy only when the tensor is strided (on its own device)
        step = max(1, CHUNK // tensor.element_size())
        for start in range(0, flat.numel(), step):
            piece = flat[start : start + step].to("cpu")
            f.write(_bytes(piece))
            written += piece.numel() * piece.element_size()
    return written


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def read(path, keep) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose names ``keep`` accepts, each read with plain reads
    into memory of its own. (The library's loader maps the file instead: every page a tensor's use
    touches then counts toward the process's memory for as long as any tensor of the file lives; a
    resumed run so held its checkpoint's weights a second time for its whole length.) The caller
    has validated the file (``safe_open``)."""
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        entries = json.loads(f.read(n))
        for name, info in entries.items():
            if name == "__metadata__" or not keep(name):
                continue
            if DTYPES.get(info["dtype"]) is None:
                raise ValueError(f"tensor {name}: dtype {info['dtype']} is not one this torch has")
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            if end > begin:
                f.seek(8 + n + begin)
                if f.readinto(_bytes(tensor)) != end - begin:
                    raise ValueError(f"tensor {name}: the file ends inside its data")
            out[name] = tensor
    return out
