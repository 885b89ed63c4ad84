"""``cogradctl init``: a checkpoint with fresh weights.

The schema options (``--tasks``, ``--features``, ``--dense``, ``--categorical``, ``--task-type``,
``--max-vocab``, ``--min-count``) and the checks on them and on ``--out`` are shared with
``cogradctl import`` (``cli/import_.py``), which infers the schema the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cogradctl.cli.core import command
from cogradctl.cli.options import Json, PluginPath, Quiet, Seed, count, csv_list, paths
from cogradctl.cli.output import emit_json, stdout
from cogradctl.console import Log
from cogradctl.errors import UsageError

Model = Annotated[str, typer.Option(help="Model plugin name (see 'cogradctl models').")]
Data = Annotated[str, typer.Option(help="Parquet file, directory or glob to infer the schema from.")]
Tasks = Annotated[str, typer.Option(help="Comma-separated label columns, e.g. click,like,share.")]
Out = Annotated[Path, typer.Option(help="Checkpoint file to write (.safetensors).")]
ModelConfig = Annotated[
    list[str] | None, typer.Option("--config", help="Model option KEY=VALUE (JSON values), repeatable.")
]
Features = Annotated[str | None, typer.Option(help="Comma-separated feature columns (default: every non-task column).")]
ExcludeFeatures = Annotated[
    str,
    typer.Option(
        help="Comma-separated columns to leave out of the default feature set (every non-task column), "
        "e.g. list or timestamp columns."
    ),
]
Dense = Annotated[str, typer.Option(help="Columns to treat as dense, overriding the inference.")]
Categorical = Annotated[str, typer.Option(help="Columns to treat as categorical, overriding the inference.")]
TaskType = Annotated[
    list[str] | None, typer.Option("--task-type", help="TASK=binary|regression (default binary), repeatable.")
]
MaxVocab = Annotated[int, typer.Option(help="Keep at most this many most frequent values per categorical feature.")]
MinCount = Annotated[int, typer.Option(help="Drop categorical values seen fewer times (they map to the OOV bucket).")]
Encoding = Annotated[
    list[str] | None,
    typer.Option(
        "--encoding",
        help="COLUMN=ENCODING, repeatable: how a categorical column's values become embedding rows: vocab "
        "(default: a vocabulary of the data, row 0 for missing and unseen values), identity:N (the values are "
        "rows 0..N-1 already), hash:N (a stable hash mod N) or vocab-file:PATH:oov=R (the team's file, line i = "
        "row i); identity and hash take :oov=R for values without a row (else they are an error), and any "
        "encoding :pad=P, the row padding list features.",
    ),
]
DenseScaling = Annotated[
    list[str] | None,
    typer.Option(
        "--dense-scaling",
        help="standard (default: (x - mean) / std of the data, missing as the mean) or none (as stored, missing "
        "as 0), for every dense column, or COLUMN=standard|none for one; repeatable.",
    ),
]
MaxLen = Annotated[
    list[str] | None,
    typer.Option(
        "--max-len",
        help="COLUMN=N, repeatable: the positions a sequence (list) feature keeps per row; a longer list keeps "
        "its first N values, counted (default: the longest list in --data).",
    ),
]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing --out file.")]


@command("init")
def init_cmd(
    model: Model,
    data: Data,
    tasks: Tasks,
    out: Out,
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
    overwrite: Overwrite = False,
    seed: Seed = 0,
    plugin_path: PluginPath = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Create a checkpoint with fresh weights: infer the schema from Parquet and build the model."""
    import torch

    from cogradctl import checkpoint as ckpt_io
    from cogradctl import contract, infer, models
    from cogradctl.train import now

    count("--seed", seed, 0)  # a seed must be a non-negative 64-bit integer (torch and numpy take no other)
    log = Log(quiet)
    opts = schema_options(locals())
    model_config = models.parse_config(config or [])
    schema, rows, encoded = infer.infer_from_options(data, opts)
    note_partition_keys(log, data, schema, opts)
    note_encodings(log, encoded, rows)
    torch.manual_seed(seed)
    net, effective = models.build(model, schema, model_config, paths(plugin_path))
    contract.check_output(net, schema, model)  # a plugin's forward must give {task: B-vector}: exit 2 now, not later
    split = models.split_parameters(net, schema.task_names, model)
    history = [{"run": "init", "data": data, "rows": rows, "seed": seed, "time": now()}]
    ckpt_io.save(ckpt_io.Checkpoint(model, effective, schema, net.state_dict(), history), out)
    log.info(
        f"wrote {out}: {model} with {split.num_shared} shared parameters, {len(schema.features)} features, "
        f"tasks {', '.join(opts.tasks)}"
    )
    summary = {
        "checkpoint": str(out),
        "model": model,
        "config": effective,
        "rows": rows,
        "tasks": {t.name: t.type for t in schema.tasks},
        "features": {f.name: f.kind for f in schema.features},
        "encodings": encoded,
        "parameters": models.parameter_counts(net, split),
    }
    if json_out:
        emit_json(summary)
    else:
        stdout.print(
            f"{out}  model={model}  rows={rows}  features={len(schema.features)}  tasks={','.join(opts.tasks)}  "
            f"shared_params={split.num_shared}"
        )


def schema_options(values: dict):
    """The schema options as the library takes them, after the checks on them and on ``--out``, from
    the command's parameters (``locals()`` of init and import, which share these options by name).
    ``--exclude-features`` narrows the default feature set, so it is refused with ``--features``."""
    from cogradctl.infer import SchemaOptions
    from cogradctl.schema import parse_task_types

    tasks, out, features, task_type = values["tasks"], values["out"], values["features"], values["task_type"]
    max_vocab, min_count = values["max_vocab"], values["min_count"]

    task_list = csv_list(tasks)
    _check(task_list, tasks, out, values["overwrite"], max_vocab, min_count)
    parse_task_types(task_type or [], task_list)  # a bad --task-type is reported before --config
    exclude = csv_list(values["exclude_features"])
    encodings, scaling = encoding_options(values["encoding"], values["dense_scaling"])
    if exclude and features:
        raise UsageError("--exclude-features narrows the default feature set: give it or --features, not both")
    return SchemaOptions(
        tasks=task_list,
        task_types=list(task_type or []),
        features=csv_list(features) if features else None,
        exclude=exclude,
        dense=csv_list(values["dense"]),
        categorical=csv_list(values["categorical"]),
        max_vocab=max_vocab,
        min_count=min_count,
        encodings=encodings,
        scaling=scaling,
        max_len=_max_lens(values["max_len"]),
    )


def _check(task_list: list[str], tasks: str, out: Path, overwrite: bool, max_vocab: int, min_count: int) -> None:
    if not task_list:
        raise UsageError("--tasks: give at least one label column")
    if len(set(task_list)) != len(task_list):
        raise UsageError(f"--tasks {tasks}: a task is named twice")
    if out.is_dir():
        raise UsageError(
            f"--out {out}: is a directory; give the checkpoint file to write, e.g. {out / 'init.safetensors'}"
        )
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out}: file exists; pass --overwrite to replace it")
    if max_vocab < 1 or min_count < 1:
        raise UsageError("--max-vocab and --min-count must be at least 1")


def note_partition_keys(log: Log, data: str, schema, opts) -> None:
    """Say which hive partition keys became features (a date key is a new value in every later run)."""
    from cogradctl.infer import partition_keys

    used = [f.name for f in schema.features if f.name in partition_keys(data)]
    if used and opts.features is None:
        log.info(
            f"partition key(s) {', '.join(used)} of the data's paths are features too; "
            f"leave them out with --exclude-features {','.join(used)}"
        )


def encoding_options(encoding: list[str] | None, dense_scaling: list[str] | None) -> tuple[dict, dict]:
    """``--encoding`` and ``--dense-scaling`` as SchemaOptions takes them: ({column: Spec}, {column or
    "*": standard|none})."""
    from cogradctl.encodings import parse_specs
    from cogradctl.schema import SCALINGS

    scaling = {}
    for item in dense_scaling or []:
        column, sep, value = item.rpartition("=")
        column = column if sep else "*"
        if value not in SCALINGS or (sep and not column):
            raise UsageError(f"--dense-scaling {item!r}: expected standard, none, or COLUMN=standard|none")
        if column in scaling:
            raise UsageError(f"--dense-scaling: {'every column' if column == '*' else column} is given twice")
        scaling[column] = value
    return parse_specs(list(encoding or [])), scaling


def _max_lens(items: list[str] | None) -> dict[str, int]:
    out = {}
    for item in items or []:
        column, _, n = item.partition("=")
        if not column or not n.isdigit() or int(n) < 1:
            raise UsageError(f"--max-len {item!r}: expected COLUMN=N with N ≥ 1")
        if column in out:
            raise UsageError(f"--max-len: column '{column}' is given twice")
        out[column] = int(n)
    return out


def note_encodings(log: Log, encoded: dict[str, dict], rows: int) -> None:
    """Say what each categorical encoding did to the data: the values a vocabulary cut (they share
    the OOV row 0) and the values without a row that took the OOV row."""
    from cogradctl.console import counted

    for col, r in encoded.items():
        for option, key in (("--max-vocab", "cut_by_max_vocab"), ("--min-count", "cut_by_min_count")):
            cut = r.get(key, {})
            if cut.get("values"):
                log.warn(
                    f"{option} cut {counted(cut['values'], 'value')} from the vocabulary of '{col}' (kept "
                    f"{r['values']} of {r['distinct']}); {counted(cut['rows'], 'row')} of {rows} hold one and "
                    "share the OOV row 0"
                )
        if r.get("cut_rows"):
            log.warn(
                f"--max-len {col}={r['max_len']}: {counted(r['cut_rows'], 'row')} of {rows} hold a longer list "
                f"(the longest: {r['longest']}), cut to its first {r['max_len']} values"
            )
        if r.get("unmapped_rows"):
            log.warn(
                f"'{col}' ({r['encoding']}): {counted(r['unmapped_rows'], 'row')} of {rows} hold a value without "
                "a row of its own and take the OOV row"
            )
        if r.get("unmapped_values"):
            log.warn(
                f"'{col}' ({r['encoding']}): {counted(r['unmapped_values'], 'list value')} have no row of their own "
                "and take the OOV row"
            )
