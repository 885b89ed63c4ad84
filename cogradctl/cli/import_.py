"""``cogradctl import``: a checkpoint from a model plugin and a team's trained weights.

The schema options are init's (``cli/init.py``), so the sample is read exactly as ``init`` reads it;
the computation is ``cogradctl.importer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cogradctl.cli.core import command
from cogradctl.cli.init import (
    Categorical,
    Dense,
    DenseScaling,
    Encoding,
    ExcludeFeatures,
    Features,
    MaxLen,
    MaxVocab,
    MinCount,
    Model,
    ModelConfig,
    Overwrite,
    Tasks,
    TaskType,
    schema_options,
)
from cogradctl.cli.options import Json, PluginPath, Quiet, Seed, count, paths
from cogradctl.cli.output import emit_json, stdout
from cogradctl.console import Log

HELP = (
    "Make a checkpoint from a model plugin and a team's trained weights (a state dict saved with torch.save, "
    "or safetensors): the schema comes from a Parquet sample as in init, the weights are stored inside the "
    "checkpoint, and its predictions on sample rows are checked against the plugin's module holding the source "
    "weights."
)


@command("import", help=HELP, short_help="A checkpoint from a model plugin and a team's trained weights (state dict).")
def import_cmd(
    model: Model,
    weights: Annotated[
        Path, typer.Option(help="The trained weights: .pt/.pth/.bin (torch.save of a state dict) or .safetensors.")
    ],
    data: Annotated[str, typer.Option(help="Parquet sample (file, directory or glob) to infer the schema from.")],
    tasks: Tasks,
    out: Annotated[Path, typer.Option(help="Checkpoint file to write (.safetensors).")],
    weights_key: Annotated[
        str | None,
        typer.Option(help="Key of the state dict inside a trainer checkpoint, e.g. state_dict or model."),
    ] = None,
    rename: Annotated[
        list[str] | None,
        typer.Option(
            "--rename",
            help="OLD=NEW: replace the key prefix OLD by NEW ('=net.' adds one, 'net.=' drops one); "
            "the first matching rule applies; repeatable.",
        ),
    ] = None,
    ignore_keys: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore-keys",
            help="Glob of source keys that are not model weights (trainer extras, e.g. torch-rechub's 'loss weight.*'); repeatable.",
        ),
    ] = None,
    config: ModelConfig = None,
    features: Features = None,
    exclude_features: ExcludeFeatures = "",
    dense: Dense = "",
    categorical: Categorical = "",
    task_type: TaskType = None,
    max_vocab: MaxVocab = 100_000,
    min_count: MinCount = 1,
    encoding: Encoding = None,
    dense_scaling: DenseScaling = None,
    max_len: MaxLen = None,
    check_rows: Annotated[int, typer.Option(help="Sample rows the self-check predicts on.")] = 64,
    overwrite: Overwrite = False,
    seed: Seed = 0,
    plugin_path: PluginPath = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    from cogradctl import models
    from cogradctl.importer import ImportRequest, import_weights
    from cogradctl.statedict import parse_rename

    count("--seed", seed, 0)  # a seed must be a non-negative 64-bit integer (torch and numpy take no other)
    log = Log(quiet)
    opts = schema_options(locals())
    request = ImportRequest(
        model=model,
        weights=weights,
        data=data,
        schema=opts,
        out=out,
        config=models.parse_config(config or []),
        weights_key=weights_key,
        rename=parse_rename(rename or []),
        ignore=list(ignore_keys or []),
        check_rows=check_rows,
        seed=seed,
        plugin_paths=paths(plugin_path),
    )
    summary = import_weights(request)
    _log(log, summary)
    if json_out:
        emit_json(summary)
        return
    m, check = summary["mapping"], summary["self_check"]
    stdout.print(
        f"{out}  model={model}  tensors={m['tensors']}  renamed={m['renamed']}  ignored={len(m['ignored'])}  "
        f"rows={summary['rows']}  tasks={','.join(summary['tasks'])}  "
        f"self-check: max |Δ| {check['max_abs_diff']:.3g} on {check['rows']} rows"
    )


def _log(log: Log, summary: dict) -> None:
    w, m, check, vocab = summary["weights"], summary["mapping"], summary["self_check"], summary["vocabulary"]
    rules = [*(["strip 'module.'"] if m["strip_module"] else []), *(f"rename {r}" for r in m["rename"])]
    log.info(
        f"read {w['tensors']} tensor(s) from {w['file']} ({w['size']} bytes, sha256 {w['sha256'][:12]}…); "
        f"{m['tensors']} matched the model ({', '.join(rules) or 'names as they are'}), {len(m['ignored'])} ignored"
    )
    if summary["converted_dtypes"]:
        log.warn(f"{len(summary['converted_dtypes'])} tensor(s) converted to the model's dtype (listed in the history)")
    log.info(
        f"self-check: all {check['tensors_equal']} tensors stored exactly; outputs on {check['rows']} sample rows "
        f"equal the plugin's module with the source weights (max |Δ| {check['max_abs_diff']:.3g})"
    )
    if vocab["values"]:
        counts = ", ".join(f"{f} {n}" for f, n in vocab["values"].items())
        oov = sum(vocab["sample_oov"].values())
        distinct = sum(n or 0 for n in vocab["sample_oov_distinct"].values())
        log.info(
            f"categorical values in the vocabulary: {counts}; outside it: {oov} sample value(s), {distinct} distinct. "
            "Any value this "
            "sample lacks (an id the team's model knows but the sample never shows) will reach the plugin as index 0, "
            "the missing bucket: import with a sample that covers the ids you serve, or keep the team's ids with "
            "--encoding COLUMN=identity:N, hash:N or vocab-file:PATH:oov=R"
        )
    if vocab["capped_by_max_vocab"]:
        log.warn(f"--max-vocab cut the vocabulary of {', '.join(vocab['capped_by_max_vocab'])}")
    log.info(f"wrote {summary['checkpoint']}: {summary['model']}, weights inside it (the source file is not needed)")
