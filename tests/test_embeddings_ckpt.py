"""Checkpoints of large tables written streaming (cogradctl.safetensors_stream, issue #24).

The oracle is the safetensors library itself: the streaming writer's file must be the bytes
``safetensors.torch.save`` makes of the same tensors and metadata (the library writes a metadata map
of several keys in an order that changes from process to process: there, everything but that order
is compared, and the library reads every tensor and the metadata back exactly).
"""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from cogradctl import checkpoint as ckpt_io
from cogradctl import models, safetensors_stream
from cogradctl import schema as schema_io
from cogradctl.errors import CheckpointError
from cogradctl.train.save import finite
from cogradctl.train.state import optimizer_tensors


def _random(shape, dtype, gen) -> torch.Tensor:
    """Any bit pattern of ``dtype`` (NaN, infinities, subnormals, -0.0 included); bool 0 or 1."""
    n = int(torch.Size(shape).numel())
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen).bool().reshape(shape)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def _supported() -> list[torch.dtype]:
    """The dtypes both the writer and this safetensors can save."""
    out = []
    for dtype in safetensors_stream.NAMES:
        try:
            st_save({"x": torch.zeros(1, dtype=dtype)})
        except (ValueError, TypeError, KeyError, RuntimeError):
            continue
        out.append(dtype)
    return out


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    dtypes = _supported()
    assert {torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool} <= set(dtypes)
    tensors = {}
    for i, dtype in enumerate(dtypes):
        tensors[f"t{i:02d}.{str(dtype).removeprefix('torch.')}"] = _random((3, 5), dtype, gen)
    base = _random((6, 4), torch.float32, gen)
    tensors.update(
        {
            "scalar": _random((), torch.float32, gen),  # 0-d: shape []
            "step": torch.tensor(7.0),
            "empty": torch.zeros(0, 4),
            "empty.i64": torch.zeros(2, 0, dtype=torch.int64),
            "strided": base.t(),  # a view, not contiguous
            "a.rows": base[1:3],  # views of one storage: the library refuses these; cogradctl's
            "a.more": base[3:],  # optimizer state of a flat parameter is saved as such views
            "Zé.ü": _random((2,), torch.bfloat16, gen),  # names sort bytewise in UTF-8
            "b": _random((1, 1, 1), torch.int64, gen),
        }
    )
    return tensors


def _library_bytes(tensors: dict, metadata) -> bytes:
    """``safetensors.torch.save`` of the same tensors: contiguous copies (it refuses strided or shared ones)."""
    return st_save({k: v.contiguous().clone() for k, v in tensors.items()}, metadata=metadata)


def _streamed(tensors: dict, metadata) -> bytes:
    f = io.BytesIO()
    written = safetensors_stream.write(f, tensors, metadata)
    assert written == len(f.getvalue())
    return f.getvalue()


NASTY = 'träin "q" \\ / \n\t\x01 \u2028 日本 😀'


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"history": NASTY}, {NASTY: ""}])
def test_streamed_file_is_byte_identical_to_the_librarys(metadata):
    tensors = _tensors()
    assert _streamed(tensors, metadata) == _library_bytes(tensors, metadata)


def test_chunked_copies_write_the_same_bytes(monkeypatch):
    """A tensor that is not contiguous on the CPU (a GPU tensor, a strided view) is copied a chunk
    at a time: chunks that do not divide it give the same file."""
    monkeypatch.setattr(safetensors_stream, "CHUNK", 12)  # 3 float32: cuts rows of 4 and 6 unevenly
    tensors = _tensors()
    assert _streamed(tensors, {"k": "v"}) == _library_bytes(tensors, {"k": "v"})


def _split(data: bytes) -> tuple[list, bytes, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n], object_pairs_hook=list), data[8 + n :], n


def test_a_checkpoint_differs_from_the_librarys_only_in_its_metadata_order(tmp_path, base_checkpoint):
    """A real checkpoint (several metadata keys, a model, optimizer-like tensors): the same header
    length, tensor entries (order, dtype, shape, offsets) and data bytes as the library's file; the
    metadata equal as a map, in the order cogradctl gives; and the library reads it all back."""
    base = ckpt_io.load(base_checkpoint)
    torch.manual_seed(0)
    net, config = models.build("mmoe", base.schema, {"num_experts": 3, "expert": [8, 4], "tower": [4]})
    extra = {f"optim.{k}": v for k, v in _tensors().items()}
    ckpt = ckpt_io.Checkpoint("mmoe", config, base.schema, net.state_dict(), base.history, extra, {"step": 3})
    path = tmp_path / "c.safetensors"
    ckpt_io.save(ckpt, path)
    ours = path.read_bytes()
    tensors, metadata = ckpt_io.contents(ckpt)
    theirs = _library_bytes(tensors, metadata)
    (head, data, n), (their_head, their_data, their_n) = _split(ours), _split(theirs)
    assert len(ours) == len(theirs) and n == their_n and data == their_data
    assert head[0][0] == their_head[0][0] == "__metadata__"
    assert head[1:] == their_head[1:]  # every tensor entry, in the same order
    assert [k for k, _ in head[0][1]] == list(metadata)  # the order given
    assert dict(head[0][1]) == dict(their_head[0][1]) == metadata
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8))
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == metadata


def test_refuses_what_safetensors_cannot_hold():
    with pytest.raises(ValueError, match="sparse"):
        safetensors_stream.header({"s": torch.eye(2).to_sparse()})
    with pytest.raises(ValueError, match="strings"):
        safetensors_stream.header({}, {"k": 1})


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def test_a_save_of_large_state_needs_no_copy_of_it(tmp_path):
    """A checkpoint of 96 MB of weights and Adam moments (the optimizer state as
    ``optimizer_tensors`` gives it to the save) raises the peak RSS by far less than the state:
    the library's ``save`` held the whole file in memory (192 MB more, measured so)."""
    try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak RSS of one save")
    weight = torch.nn.Parameter(torch.zeros(1 << 19, 16))  # 32 MB, and as much for each moment
    optimizer = torch.optim.Adam([weight])
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    weight.grad = None
    schema = schema_io.Schema([schema_io.Feature("x", "dense")], [schema_io.Task("click", "binary")])
    ckpt = ckpt_io.Checkpoint("m", {}, schema, {"w": weight.detach()}, [], optimizer_tensors(optimizer, ["w"]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_mb("VmRSS")
    ckpt_io.save(ckpt, tmp_path / "c.safetensors")
    grown = _rss_mb("VmHWM") - before
    back = ckpt_io.load(tmp_path / "c.safetensors")
    assert torch.equal(back.extra["optim.exp_avg.w"], optimizer.state[weight]["exp_avg"])
    assert float(back.extra["optim.step.w"]) == 1.0 and torch.equal(back.state["w"], weight.detach())
    assert grown < 32, f"the save raised the peak RSS by {grown:.0f} MB"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_finite_agrees_with_isfinite(dtype):
    """save.finite (every save's check for non-finite weights) against ``isfinite(t).all()``."""
    gen = torch.Generator().manual_seed(1)
    cases = [torch.zeros(0, 3, dtype=dtype), torch.tensor(-0.0, dtype=dtype), torch.tensor(float("nan"), dtype=dtype)]
    for bad in (None, float("nan"), float("inf"), -float("inf")):
        for where in (0, 17, -1):
            t = torch.randn(5, 7, generator=gen).to(dtype) * 100
            if bad is not None:
                t.view(-1)[where] = bad
            cases += [t, t.t()]
    cases.append(_random((64,), dtype, gen))  # any bit pattern: NaNs, infinities, subnormals
    for t in cases:
        assert bool(finite(t)) == bool(torch.isfinite(t).all()), t


def test_the_finiteness_check_needs_no_temporary_of_the_tables_size():
    """``isfinite(t).all()`` on a 64 MB table made temporaries of more than its size (at every
    save, on top of the tables and their moments); ``finite`` none."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak RSS")
    table = torch.ones(1 << 20, 16)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_mb("VmRSS")
    assert bool(finite(table))
    assert _rss_mb("VmHWM") - before < 8


def test_load_part_reads_what_load_reads(tmp_path, base_checkpoint):
    """A resumed run's reads (the weights, then the rest) against ``load`` (the library's reader):
    every tensor, bit for bit; and a damaged file is a CheckpointError naming it."""
    base = ckpt_io.load(base_checkpoint)
    net, config = models.build("mmoe", base.schema, {"num_experts": 3, "expert": [8, 4], "tower": [4]})
    extra = {f"optim.{k}": v for k, v in _tensors().items()}
    path = tmp_path / "c.safetensors"
    ckpt_io.save(ckpt_io.Checkpoint("mmoe", config, base.schema, net.state_dict(), [], extra, {"step": 3}), path)
    want = ckpt_io.load(path)
    for got, expected in (
        (ckpt_io.load_part(path, weights=True), want.state),
        (ckpt_io.load_part(path, False), want.extra),
    ):
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
            assert torch.equal(got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    damaged = tmp_path / "d.safetensors"
    damaged.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="d.safetensors: corrupt checkpoint"):
        ckpt_io.load_part(damaged, weights=False)


def test_load_part_does_not_map_the_file(tmp_path):
    """The library's reader maps the file: the pages a copy touches stay resident while any of its
    tensors lives. ``load_part`` reads into the process's own memory: its file-backed RSS stays."""
    schema = schema_io.Schema([schema_io.Feature("x", "dense")], [schema_io.Task("click", "binary")])
    state = {"w": torch.ones(1 << 20, 16), "v": torch.ones(4)}  # 64 MB
    ckpt_io.save(ckpt_io.Checkpoint("m", {}, schema, state, []), tmp_path / "c.safetensors")
    before = _rss_mb("RssFile")
    weights = ckpt_io.load_part(tmp_path / "c.safetensors", weights=True)
    assert torch.equal(weights["w"], state["w"])
    assert _rss_mb("RssFile") - before < 8
    mapped = ckpt_io.load(tmp_path / "c.safetensors").state
    assert torch.equal(mapped["w"], state["w"])  # touches every page of w
    assert _rss_mb("RssFile") - before > 48  # what the test would catch
