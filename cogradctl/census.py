"""UCI Census-Income (KDD) → Parquet, in the multi-task setup of the MMoE paper (Ma et al., KDD 2018).

Input: ``census-income.data.gz`` and ``census-income.test.gz`` as UCI distributes them (42 columns
separated by ", ", no header, ``?`` for missing, the income class last with a trailing period).

Output (in ``--out``): ``train.parquet`` (the UCI training split), ``valid.parquet`` and
``test.parquet`` (the UCI test split shuffled with a fixed seed and halved, the first half being
validation), and ``census.json`` describing what was done. Every file is written atomically.

Decisions (stated in README.md):

* Labels (int8 0/1): ``income`` = income > 50K (``50000+.``); ``marital`` = marital status
  "Never married"; ``education`` = education at least college, i.e. an associate, bachelor's,
  master's, doctorate or professional degree ("Some college but no degree" is not). Group 1 writes
  income and marital, group 2 education and marital, ``all`` the three.
* The source column of each written label is removed from the features; every other column is kept,
  as the public MMoE references do, so that AUCs are comparable. In group 2 the UCI income class is
  therefore an ordinary feature (``income_class``, string). ``--drop-leaky`` also removes the two
  household-relationship columns that spell out marriage ("Spouse of householder", "…never marr…").
* ``instance weight`` is never written (UCI: a sampling weight, "ignore" for classifiers).
* The seven continuous columns are float64 (the tool makes them dense features); nominal columns are
  strings; the nominal columns that UCI codes as integers (industry and occupation recodes, own
  business, veterans benefits, year) are int32, which the tool also treats as categorical: an
  embedding per code, never a magnitude. ``?`` becomes null (the tool's missing bucket / the mean).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from cogradctl.atomic_files import atomic_write_bytes
from cogradctl.errors import DataError, UsageError
from cogradctl.sample import write as write_parquet

FILES = {"train": "census-income.data.gz", "test": "census-income.test.gz"}

# The 42 columns in file order (census-income.names, snake_case).
COLUMNS = [
    "age",
    "class_of_worker",
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "education",
    "wage_per_hour",
    "enroll_in_edu_inst_last_wk",
    "marital_stat",
    "major_industry_code",
    "major_occupation_code",
    "race",
    "hispanic_origin",
    "sex",
    "member_of_a_labor_union",
    "reason_for_unemployment",
    "full_or_part_time_employment_stat",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "tax_filer_stat",
    "region_of_previous_residence",
    "state_of_previous_residence",
    "detailed_household_and_family_stat",
    "detailed_household_summary_in_household",
    "instance_weight",
    "migration_code_change_in_msa",
    "migration_code_change_in_reg",
    "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt",
    "num_persons_worked_for_employer",
    "family_members_under_18",
    "country_of_birth_father",
    "country_of_birth_mother",
    "country_of_birth_self",
    "citizenship",
    "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits",
    "weeks_worked_in_year",
    "year",
    "income_class",
]
NUM_COLUMNS = len(COLUMNS)
CONTINUOUS = [
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "num_persons_worked_for_employer",
    "weeks_worked_in_year",
]
CODED = [
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "own_business_or_self_employed",
    "veterans_benefits",
    "year",
]
IGNORED = ["instance_weight"]
LEAKY = ["detailed_household_and_family_stat", "detailed_household_summary_in_household"]
COLLEGE = {
    "Associates degree-occup /vocational",
    "Associates degree-academic program",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Doctorate degree(PhD EdD)",
    "Prof school degree (MD DDS DVM LLB JD)",
}
LABELS = {"income": "income_class", "marital": "marital_stat", "education": "education"}  # label: source column
GROUPS = {"1": ["income", "marital"], "2": ["education", "marital"], "all": ["income", "marital", "education"]}
DEFAULT_SEED = 2018


def read_raw(path: Path) -> pa.Table:
    """One raw UCI file → a table of 42 string columns (whitespace trimmed, ``?`` as null)."""
    if not path.is_file():
        raise DataError(
            f"{path}: no such file (expected the UCI Census-Income (KDD) files {', '.join(FILES.values())})"
        )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except EOFError:
        raise DataError(f"{path}: truncated gzip file (compressed data ends before the end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    _check_lines(raw, path)
    try:
        table = pacsv.read_csv(
            io.BytesIO(raw),
            read_options=pacsv.ReadOptions(column_names=COLUMNS, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=",", quote_char=False, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in COLUMNS}, strings_can_be_null=False
            ),
        )
    except pa.ArrowException as exc:
        raise DataError(f"{path}: not in the UCI format ({str(exc).splitlines()[0][:200]})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no rows")
    columns = []
    for name in COLUMNS:
        col = pc.utf8_trim_whitespace(table.column(name))
        if name == "income_class":
            col = pc.utf8_rtrim(col, characters=".")
        columns.append(pc.if_else(pc.equal(col, "?"), pa.scalar(None, pa.string()), col))
    return pa.table(columns, names=COLUMNS)


def _check_lines(raw: bytes, path: Path) -> None:
    """Every non-empty line has 42 fields; otherwise name the file and the first bad line."""
    if b"\n" not in raw and raw.strip():
        lines = [raw]
    else:
        lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.count(b",") + 1
        if fields != NUM_COLUMNS:
            raise DataError(
                f"{path}: line {number} has {fields} columns, expected {NUM_COLUMNS} (is the file truncated or not the UCI census-income file?)"
            )
        if number == 1:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}: line 1 is not text; not the UCI census-income file") from None


def convert(raw: pa.Table, path: Path, group: str, drop_leaky: bool) -> pa.Table:
    """Labels, typed features and the dropped columns of one raw table."""
    labels = GROUPS[group]
    sources = {LABELS[label] for label in labels}
    drop = set(IGNORED) | sources | (set(LEAKY) if drop_leaky else set())
    out = {}
    for name in COLUMNS:
        if name in drop:
            continue
        col = raw.column(name)
        try:
            if name in CONTINUOUS:
                col = col.cast(pa.float64())
            elif name in CODED:
                col = col.cast(pa.int32())
        except pa.ArrowInvalid as exc:
            raise DataError(
                f"{path}: column '{name}' has a non-numeric value ({str(exc).splitlines()[0][:120]})"
            ) from None
        out[name] = col
    for label in labels:
        source = raw.column(LABELS[label])
        if source.null_count:
            raise DataError(
                f"{path}: column '{LABELS[label]}' (source of label '{label}') has {source.null_count} missing value(s)"
            )
        if label == "income":
            unknown = pc.sum(pc.invert(pc.is_in(source, pa.array(["- 50000", "50000+"])))).as_py()
            if unknown:
                raise DataError(
                    f"{path}: column 'income_class' has {unknown} value(s) other than '- 50000.' and '50000+.'"
                )
            flag = pc.equal(source, "50000+")
        elif label == "marital":
            flag = pc.equal(source, "Never married")
        else:
            flag = pc.is_in(source, pa.array(sorted(COLLEGE)))
        out[label] = flag.cast(pa.int8())
    return pa.table(out)


def halve(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of (valid, test): a seeded permutation of range(n), first half valid."""
    order = np.random.default_rng(seed).permutation(n)
    half = (n + 1) // 2
    return np.sort(order[:half]), np.sort(order[half:])


def prepare(
    source: Path,
    out: Path,
    group: str = "1",
    drop_leaky: bool = False,
    seed: int = DEFAULT_SEED,
    overwrite: bool = False,
) -> dict:
    """Read the two raw files, write train/valid/test Parquet and census.json into ``out``. → summary."""
    if group not in GROUPS:
        raise UsageError(f"--group {group}: expected one of {', '.join(GROUPS)}")
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise DataError(f"--source {source}: no such directory")
    names = ["train.parquet", "valid.parquet", "test.parquet", "census.json"]
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise UsageError(f"--out {out}: already holds {', '.join(existing)}; pass --overwrite to replace")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    train = convert(read_raw(source / FILES["train"]), source / FILES["train"], group, drop_leaky)
    test_all = convert(read_raw(source / FILES["test"]), source / FILES["test"], group, drop_leaky)
    valid_idx, test_idx = halve(test_all.num_rows, seed)
    splits = {"train": train, "valid": test_all.take(pa.array(valid_idx)), "test": test_all.take(pa.array(test_idx))}
    out.mkdir(parents=True, exist_ok=True)
    labels = GROUPS[group]
    summary = {
        "source": str(source),
        "group": group,
        "labels": labels,
        "label_definitions": {
            "income": "income_class is '50000+.' (income > 50K)",
            "marital": "marital_stat is 'Never married'",
            "education": "education is an associate, bachelor's, master's, doctorate or professional degree",
        },
        "drop_leaky": drop_leaky,
        "dropped_columns": sorted(
            set(IGNORED) | {LABELS[label] for label in labels} | (set(LEAKY) if drop_leaky else set())
        ),
        "seed": seed,
        "features": {
            name: (
                "dense (float64)"
                if name in CONTINUOUS
                else "categorical (int32 code)"
                if name in CODED
                else "categorical (string)"
            )
            for name in train.column_names
            if name not in labels
        },
        "splits": {},
    }
    for name, table in splits.items():
        path = out / f"{name}.parquet"
        write_parquet(table, path)
        summary["splits"][name] = {
            "path": str(path),
            "rows": table.num_rows,
            "positive_rate": {
                label: round(float(pc.mean(table.column(label).cast(pa.float64())).as_py()), 6) for label in labels
            },
        }
    atomic_write_bytes(out / "census.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
