"""Which Parquet columns ``init`` (and ``import``) can make features, and of what kind: each column's
Arrow type and the ``--features``/``--exclude-features``/``--dense``/``--categorical`` choices →
{column: kind} (:func:`plan_columns`), every unusable column named in one error.
"""

from __future__ import annotations

import pyarrow as pa

from cogradctl.errors import DataError, UsageError
from cogradctl.schema import is_categorical_type, is_dense_type, is_label_type, is_list_type, is_numeric_type

# Arrow types a feature column may have, in words, for messages.
FEATURE_TYPES = (
    "float (dense), integer, boolean, string or dictionary (categorical), a list of those (sequence) or a "
    "list of floats (vector)"
)


def plan_columns(
    arrow_schema: pa.Schema,
    source: str,
    tasks: list[str],
    features: list[str] | None,
    dense: list[str],
    categorical: list[str],
    exclude: list[str] = (),
) -> dict[str, str]:
    """Decide each feature column's kind from its Arrow type and the overrides: {column: kind}.

    ``features`` None: every column that is not a task or in ``exclude``. Every column that cannot be a
    feature is named in one error, with its type and what to do."""
    names = arrow_schema.names
    for col in [*tasks, *(features or []), *dense, *categorical]:
        if col not in names:
            raise DataError(f"{source}: no column '{col}' (columns: {', '.join(names)})")
    _check_exclude(names, source, list(exclude), tasks, features, dense, categorical)
    both = set(dense) & set(categorical)
    if both:
        raise UsageError(f"column(s) {', '.join(sorted(both))} given to both --dense and --categorical")
    chosen = features if features else [n for n in names if n not in tasks and n not in exclude]
    chosen = [c for c in chosen if c not in tasks]
    if not chosen:
        raise UsageError(f"{source}: no feature columns left besides the tasks {', '.join(tasks)}")
    kinds, unusable = {}, []
    for col in chosen:
        t = arrow_schema.field(col).type
        kind, problem = _kind(t, col in dense, col in categorical)
        if not kind:
            unusable.append((col, t, problem))
        else:
            kinds[col] = kind
    if unusable:
        raise DataError(_unusable_message(source, unusable, features is not None))
    for task in tasks:
        t = arrow_schema.field(task).type
        if not is_label_type(t):
            raise DataError(f"{source}: task column '{task}' is {t}; labels must be numeric or boolean")
    return kinds


def _check_exclude(names, source, exclude, tasks, features, dense, categorical) -> None:
    """Each ``--exclude-features`` name must be a column that no other option asks for."""
    for col in exclude:
        if col not in names:
            raise DataError(f"{source}: --exclude-features {col}: no column '{col}' (columns: {', '.join(names)})")
        given = {"--tasks": tasks, "--features": features or [], "--dense": dense, "--categorical": categorical}
        for option, cols in given.items():
            if col in cols:
                raise UsageError(f"--exclude-features {col}: the column is also given to {option}")


def _kind(t: pa.DataType, as_dense: bool, as_categorical: bool) -> tuple[str, str]:
    """(kind, "") for a usable column of type ``t``, else ("", what an override asked that it cannot give)."""
    numeric = pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)
    if is_list_type(t):
        return _list_kind(t.value_type, as_dense, as_categorical)
    if as_dense:
        return ("dense", "") if numeric else ("", "--dense needs a numeric column")
    if as_categorical or is_categorical_type(t):
        if is_categorical_type(t) or pa.types.is_floating(t):
            return "categorical", ""
        return "", "a categorical feature needs integer, boolean, string or dictionary values"
    if is_dense_type(t):
        return "dense", ""
    return "", ""


def _list_kind(v: pa.DataType, as_dense: bool, as_categorical: bool) -> tuple[str, str]:
    """A list column: lists of integers or strings are sequence features (``--dense``: integers as
    a vector), lists of floats vector features (``--categorical``: not possible)."""
    if as_dense or (pa.types.is_floating(v) and not as_categorical):
        return ("vector", "") if is_numeric_type(v) else ("", "--dense needs a list of numbers")
    if is_categorical_type(v):
        return "sequence", ""
    if as_categorical:
        return "", "a sequence feature needs lists of integers, booleans or strings"
    return "", f"lists of {v} are not read (lists of integers or strings, or of floats, are)"


def _unusable_message(source: str, unusable: list, chosen: bool) -> str:
    listed = "; ".join(f"'{c}' is {t}{f' ({p})' if p else ''}" for c, t, p in unusable)
    cols = ",".join(c for c, _, _ in unusable)
    hints = []
    if any(pa.types.is_temporal(t) for _, t, _ in unusable):
        hints.append("a number derived from a timestamp (e.g. the hour of day) can be stored as its own column")
    todo = f"drop {cols} from --features" if chosen else f"leave them out with --exclude-features {cols}"
    return (
        f"{source}: {len(unusable)} column(s) cannot be features: {listed}. A feature is {FEATURE_TYPES}; "
        f"{todo}{''.join('; ' + h for h in hints)}"
    )
