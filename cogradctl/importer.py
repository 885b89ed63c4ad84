"""Import a model trained outside cogradctl: a model plugin and the team's state dict → a checkpoint.

``import_weights`` does, each step an error naming what is wrong (exit 2) before a byte is written:

1. read the source weights (``statedict.read``): ``.pt``/``.pth``/``.bin`` through
   ``torch.load(weights_only=True)``, which never runs pickled code, or ``.safetensors``;
2. infer the schema from the Parquet sample exactly as ``init`` does, and build the plugin for it;
3. map the source's keys onto the model's state-dict keys (``statedict.map_keys``): trainer extras left out
   (``--ignore-keys``), DDP's ``module.`` prefix stripped, prefixes renamed (``--rename``); strict
   otherwise: every model tensor (parameters and buffers) matched, with the same shape;
4. stage the checkpoint beside ``--out``, load it back through the plugin as every later command
   will, and compare it with the plugin's module holding the source tensors (``load_state_dict``,
   strict): every tensor bit for bit, and the outputs on a few sample rows to 1e-6;
5. rename it into place.

The weights end up inside the checkpoint; the source's path, size and sha256 and the key mapping
are recorded in its history (``"run": "import"``), never in ``model_config``, so no later command
depends on the source file. ``export`` reads the mapping back to restore the team's key names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import contract, infer, models, registry
from cogradctl.errors import CheckpointError, PluginError, UsageError
from cogradctl.schema import Schema
from cogradctl.statedict import KeyMap, Source, map_keys, read

TOLERANCE = 1e-6  # the self-check's bound on |imported − source| outputs (they are equal in practice)


@dataclass
class ImportRequest:
    """What ``cogradctl import`` was asked to do (the command line, parsed)."""

    model: str
    weights: Path
    data: str
    schema: infer.SchemaOptions
    out: Path
    config: dict = field(default_factory=dict)
    weights_key: str | None = None
    rename: list[tuple[str, str]] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    check_rows: int = 64
    seed: int = 0
    plugin_paths: list[str] = field(default_factory=list)


def import_weights(req: ImportRequest) -> dict:
    """Write ``req.out`` from the team's weights; → a summary (the command's ``--json`` document)."""
    from cogradctl.train import now

    if req.check_rows < 1:
        raise UsageError("--check-rows must be at least 1")
    if req.out.resolve() == req.weights.resolve():
        raise UsageError(f"--out {req.out}: is the --weights file; the source is never modified, write elsewhere")
    registry.lookup("models", req.model, req.plugin_paths)  # an unknown or broken plugin first: it is cheap
    source = read(req.weights, req.weights_key)
    schema, rows, encoded = infer.infer_from_options(req.data, req.schema)
    torch.manual_seed(req.seed)
    net, effective = models.build(req.model, schema, req.config, req.plugin_paths)
    contract.check_output(net, schema, req.model)  # {task: B-vector}, or exit 2 before anything is written
    split = models.split_parameters(net, schema.task_names, req.model)
    keys = map_keys(source.tensors, net.state_dict(), req.rename, req.ignore, f"--weights {req.weights}", req.model)
    mapped = {m: source.tensors[s] for m, s in keys.mapping.items()}
    state = _loaded_state(net, mapped, req.model)
    converted = {m: str(source.tensors[s].dtype).removeprefix("torch.") for m, s in keys.mapping.items()}
    converted = {m: d for m, d in converted.items() if state[m].dtype != mapped[m].dtype}
    entry = {
        "run": "import",
        "data": req.data,
        "rows": rows,
        "seed": req.seed,
        "time": now(),
        "weights": source.provenance(),
        "mapping": keys.record(),
        **({"converted_dtypes": converted} if converted else {}),
    }
    ckpt = ckpt_io.Checkpoint(req.model, effective, schema, state, [entry])
    batch = sample_rows(req.data, schema, req.check_rows)
    with ckpt_io.staged_checkpoint(req.out, ckpt) as staged:
        check = self_check(staged, req, schema, effective, mapped, batch)
    return {
        "checkpoint": str(req.out),
        "model": req.model,
        "config": effective,
        "rows": rows,
        "tasks": {t.name: t.type for t in schema.tasks},
        "features": {f.name: f.kind for f in schema.features},
        "parameters": models.parameter_counts(net, split),
        "weights": source.provenance(),
        "mapping": _mapping_summary(keys, source),
        "converted_dtypes": converted,
        "self_check": check,
        "vocabulary": vocabulary_report(schema, encoded),
    }


def _loaded_state(net: torch.nn.Module, mapped: dict[str, torch.Tensor], plugin: str) -> dict[str, torch.Tensor]:
    """The model's state dict after a strict ``load_state_dict`` of the mapped source tensors."""
    try:
        net.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:  # map_keys checked names and shapes: a dtype torch cannot convert
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"the weights do not load into model plugin '{plugin}': {first}") from exc
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _mapping_summary(keys: KeyMap, source: Source) -> dict:
    return {
        "tensors": len(keys.mapping),
        "renamed": sum(1 for m, s in keys.mapping.items() if m != s),
        "ignored": keys.ignored,
        "strip_module": keys.strip_module,
        "rename": [f"{old}={new}" for old, new in keys.rename],
        "weights_key": source.weights_key,
    }


def sample_rows(spec: str, schema: Schema, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` rows of the sample, encoded as a batch (:mod:`cogradctl.batch`)."""
    from cogradctl.stream import ParquetStream

    return ParquetStream(spec, schema).rows([(0, n)]).inputs(slice(None))


def self_check(
    staged: Path, req: ImportRequest, schema: Schema, config: dict, mapped: dict[str, torch.Tensor], batch: dict
) -> dict:
    """Load the staged checkpoint as later commands will and compare it with the source.

    Every stored tensor must equal its source tensor bit for bit (after the dtype conversion that
    ``load_state_dict`` makes, if any), and on ``batch`` the loaded model's outputs must equal, to
    ``TOLERANCE``, those of a fresh build of the plugin holding the source tensors: so nothing was
    dropped or altered, and the stored config rebuilds the same model.
    """
    ckpt, loaded, _ = models.from_checkpoint(staged, req.plugin_paths)
    if json.dumps(ckpt.model_config) != json.dumps(config):  # order included: plugins may build inputs from it
        raise CheckpointError("self-check: the stored model config does not read back as given")
    if set(ckpt.state) != set(mapped):
        raise CheckpointError(f"self-check: the written checkpoint holds other tensors than the {len(mapped)} mapped")
    for name, want in mapped.items():
        got = ckpt.state[name]
        if not _same_bits(got, want.to(got.dtype)):
            raise CheckpointError(f"self-check: tensor {name} differs from the source after writing")
    torch.manual_seed(req.seed)
    reference, _ = models.build(req.model, schema, config, req.plugin_paths)
    reference.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        want, got = reference.eval()(batch), loaded.eval()(batch)
    diffs = {t: float((want[t].double() - got[t].double()).abs().max()) for t in schema.task_names}
    worst = max(diffs.values())
    if not worst <= TOLERANCE:  # NaN fails too
        raise PluginError(
            f"self-check: on {len(batch['dense'])} sample rows the imported model's outputs differ from the plugin's "
            f"module holding the source weights by up to {worst:.3g} (tolerance {TOLERANCE:g}): the plugin's forward "
            "must be deterministic in eval mode, and its config must rebuild the same model"
        )
    return {"rows": len(batch["dense"]), "max_abs_diff": worst, "per_task": diffs, "tensors_equal": len(mapped)}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def vocabulary_report(schema: Schema, encoded: dict[str, dict]) -> dict:
    """How many sample rows took a categorical feature's OOV row, per feature, from inference's
    report (``encoded``): for ``vocab`` the values ``--min-count`` or ``--max-vocab`` cut, for the
    other encodings the values without a row of their own. With ``vocab`` a value the team's model
    knows but the sample lacks reaches the plugin as index 0 (see ``layers.OriginalIds``); the
    ``identity``, ``hash`` and ``vocab-file`` encodings keep the team's ids whatever the sample holds.
    """
    oov, distinct = {}, {}
    for f in schema.categorical:
        r = encoded[f.name]
        if f.encoding == "vocab":
            cut = (r["cut_by_max_vocab"], r["cut_by_min_count"])
            oov[f.name], distinct[f.name] = sum(c["rows"] for c in cut), sum(c["values"] for c in cut)
        else:
            oov[f.name], distinct[f.name] = r["unmapped_rows"], None
    return {
        "values": {f.name: len(f.vocab) for f in schema.categorical if f.encoding == "vocab"},
        "sample_oov": oov,  # rows whose value took the OOV row
        "sample_oov_distinct": distinct,  # distinct such values (vocab encoding)
        "capped_by_max_vocab": [c for c, r in encoded.items() if r.get("cut_by_max_vocab", {}).get("values")],
        "encodings": encoded,
    }
