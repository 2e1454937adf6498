"""Tables (CSV) as embedding shards: chosen feature columns, a protected column, an optional label.

The fair-clustering benchmarks Census/Adult and Bank (the dissertation's Figure 6.2, DFDC vs
scalable fair clustering; ``tabular/adult.csv``, ``tabular/bank.csv``) are tables: each row is a
sample (METHODS.md §1) whose "embedding" is its feature vector.

- Features: the chosen columns (default: every numeric column except the protected and label
  columns; with ``one_hot`` also every categorical one). A column that is numeric except for some
  cells (``abc`` among numbers) is an error naming the line, column and value, never silently left
  out; the categorical columns left out of the default features are logged and listed in
  ``source["skipped_columns"]``. A categorical feature becomes one 0/1
  column per value, ``<column>=<value>``, values sorted. With ``standardize`` (the default) every
  feature column ``j`` is z-scored over the rows kept, ``z_ij = (x_ij - mean_j) / std_j`` with the
  population standard deviation ``std_j = sqrt(mean_i (x_ij - mean_j)^2)``; a constant column
  (``std_j = 0``) is divided by 1 and so becomes all zeros. Means and deviations are recorded in
  the manifest's ``source``.
- Protected attribute(s): the column's distinct values, sorted (numerically when every value is a
  number), are the group names; a missing value becomes -1 (unknown) and is counted. A protected
  column with a single group (no fairness to measure) is a warning, logged and recorded in
  ``source["warnings"]``.
- Label: its distinct values, sorted the same way, are coded 0, 1, ... and stored as the identity;
  the code -> name table is ``source["identity_names"]``; a missing label is -1.

Missing values are empty fields and the markers in ``MISSING`` (after stripping spaces); a missing
or non-finite feature is an error naming the line and column unless ``drop_missing`` drops the row
(ids are then the kept rows in file order; the count is in ``source["dropped_rows"]``).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dist_fair.data.schema import Manifest
from dist_fair.data.shards import UNKNOWN, write_embedding_shards
from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

#: Field values read as missing (compared after stripping surrounding spaces).
MISSING = frozenset({"", "?", "NA", "N/A", "NaN", "nan", "null", "NULL"})


@dataclass
class Table:
    """A CSV file read column-wise: stripped strings, ``None`` where missing."""

    path: str
    columns: list[str]
    values: dict[str, list[str | None]]
    lines: list[int]            # file line number of every row (for messages)
    sep: str

    def __len__(self) -> int:
        return len(self.lines)

    def column(self, name: str) -> list[str | None]:
        if name not in self.values:
            raise DataError(f"{self.path}: no column {name!r}; available columns: {self.columns}")
        return self.values[name]


@dataclass
class TableData:
    """A table turned into arrays, in row (= id) order, ready to be written or used in memory."""

    emb: np.ndarray                          # float32 (n, d)
    feature_names: list[str]
    identity: np.ndarray                     # int64 (n,), label codes, -1 = missing / no label
    identity_names: list[str] | None
    attrs: dict[str, np.ndarray]             # protected column -> int16 (n,), -1 = missing
    attribute_names: dict[str, list[str]]
    mean: np.ndarray                         # per feature, before standardising (zeros if not)
    std: np.ndarray                          # per feature (ones if not standardised)
    dropped_lines: list[int] = field(default_factory=list)
    missing_counts: dict[str, int] = field(default_factory=dict)   # protected/label column -> missing
    skipped_columns: list[str] = field(default_factory=list)       # categorical, not in the default features
    warnings: list[str] = field(default_factory=list)


def _detect_sep(header_line: str) -> str:
    counts = {sep: header_line.count(sep) for sep in (",", ";", "\t", "|")}
    sep = max(counts, key=lambda s: counts[s])
    return sep if counts[sep] else ","


def read_table(path: str | Path, sep: str | None = None, limit: int | None = None,
               missing: frozenset[str] = MISSING) -> Table:
    """Read a CSV file with a header row (``sep`` detected from the header when ``None``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"table {path} not found; pass a CSV file with a header row")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        header_line = handle.readline()
        if not header_line.strip():
            raise DataError(f"{path}: the first line is empty; the file needs a header row naming the columns")
        sep = sep or _detect_sep(header_line)
        handle.seek(0)
        reader = csv.reader(handle, delimiter=sep, skipinitialspace=True)
        columns = [c.strip() for c in next(reader)]
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        if duplicates or "" in columns:
            raise DataError(f"{path}: the header has duplicate or empty column names {duplicates or ['']}; "
                            "rename them so every column has a distinct name")
        cells: list[list[str | None]] = [[] for _ in columns]
        lines: list[int] = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(columns):
                raise DataError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(columns)} "
                                f"(separator {sep!r}); fix the line or pass the right --sep")
            for col, value in zip(cells, row):
                value = value.strip()
                col.append(None if value in missing else value)
            lines.append(reader.line_num)
            if limit is not None and len(lines) >= limit:
                break
    if not lines:
        raise DataError(f"{path}: no data rows after the header")
    return Table(str(path), columns, dict(zip(columns, cells)), lines, sep)


def _as_numbers(values: Sequence[str | None]) -> np.ndarray | None:
    """float64 array (NaN where missing) if every present value is a number, else None."""
    out = np.empty(len(values), np.float64)
    for i, value in enumerate(values):
        if value is None:
            out[i] = np.nan
            continue
        try:
            out[i] = float(value)
        except ValueError:
            return None
    return out


def sorted_values(values: Sequence[str | None]) -> list[str]:
    """Distinct present values, sorted numerically when all are numbers, else as strings."""
    distinct = {v for v in values if v is not None}
    try:
        return sorted(distinct, key=lambda v: (float(v), v))
    except ValueError:
        return sorted(distinct)


def _codes(values: Sequence[str | None], names: list[str], dtype: type) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    return np.array([UNKNOWN if v is None else index[v] for v in values], dtype=dtype)


def _mixed_column_error(table: Table, col: str, one_hot: bool) -> DataError | None:
    """An error when column ``col`` holds numbers except for some cells, else None."""
    values = table.values[col]
    numbers = bad = 0
    first_bad = -1
    for i, value in enumerate(values):
        if value is None:
            continue
        try:
            float(value)
            numbers += 1
        except ValueError:
            bad += 1
            if first_bad < 0:
                first_bad = i
    if not numbers or not bad or bad > numbers:  # categorical (mostly words), not a broken numeric column
        return None
    return DataError(f"{table.path}, line {table.lines[first_bad]} (data row {first_bad}), column {col!r}: value "
                     f"{values[first_bad]!r} is not a number, but {numbers} of the column's {numbers + bad} values "
                     f"are ({bad} are not); it would be left out of the features. Fix the value, or mark it missing "
                     f"('' or '?', then --drop-missing), or leave the column out (--exclude {col})"
                     + ("" if one_hot else f", or encode it as categories (--features ... {col} --one-hot)"))


def _first_non_number(values: Sequence[str | None]) -> tuple[int, str]:
    for i, value in enumerate(values):
        if value is not None:
            try:
                float(value)
            except ValueError:
                return i, value
    return -1, ""


def table_arrays(table: Table, protected: str | Sequence[str], label: str | None = None,
                 features: Sequence[str] | None = None, exclude: Sequence[str] = (), one_hot: bool = False,
                 standardize: bool = True, drop_missing: bool = False) -> TableData:
    """Features, protected attribute(s) and label codes of a table (formulas in the module docstring).

    Args:
        table: from ``read_table``.
        protected: the protected column, or several.
        label: the column whose values become identities (codes), or None (identities unknown).
        features: feature columns in this order; default every numeric column (and with
            ``one_hot`` every categorical column) other than protected, label and ``exclude``.
        one_hot: encode categorical feature columns as 0/1 columns; without it a non-numeric
            feature is an error.
        standardize: z-score every feature column.
        drop_missing: drop rows with a missing feature instead of failing.
    """
    protected = [protected] if isinstance(protected, str) else list(protected)
    if not protected:
        raise DataError("name at least one protected column (--protected)")
    for name in [*protected, *([label] if label else []), *(features or []), *exclude]:
        table.column(name)  # raises with the list of available columns
    if label is not None and label in protected:
        raise DataError(f"column {label!r} is both the label and a protected attribute; choose different columns")
    numeric = {c: _as_numbers(table.values[c]) for c in table.columns}
    skipped: list[str] = []
    if features is None:
        skip = set(protected) | {label} | set(exclude)
        for c in table.columns:
            if c not in skip and numeric[c] is None:
                error = _mixed_column_error(table, c, one_hot)
                if error is not None:
                    raise error
        features = [c for c in table.columns if c not in skip and (numeric[c] is not None or one_hot)]
        skipped = [c for c in table.columns if c not in skip and numeric[c] is None and not one_hot]
        if skipped:
            LOG.info("%s: categorical columns %s are not features (pass --one-hot to encode them)", table.path,
                     skipped)
        if not features:
            raise DataError(f"{table.path}: no feature columns left (numeric columns other than "
                            f"{sorted(skip - {None})}); name them with --features, or pass --one-hot to use "
                            "categorical columns")
    else:
        features = list(features)
        clash = sorted(set(features) & (set(protected) | {label}))
        if clash:
            raise DataError(f"columns {clash} are protected/label columns and cannot also be features")
    n = len(table)
    present = np.ones(n, bool)
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for col in features:
        numbers = numeric[col]
        if numbers is None:
            if not one_hot:
                row, value = _first_non_number(table.values[col])
                raise DataError(f"{table.path}, line {table.lines[row]}: feature column {col!r} is not numeric "
                                f"(value {value!r}); pass --one-hot to encode it as 0/1 columns, or leave it out "
                                "of --features")
            values = table.values[col]
            ok = np.array([v is not None for v in values])
            categories = sorted_values(values)
            codes = _codes(values, categories, np.int64)
            onehot = np.zeros((n, len(categories)), np.float64)
            onehot[np.nonzero(ok)[0], codes[ok]] = 1.0
            blocks.append(onehot)
            names += [f"{col}={c}" for c in categories]
        else:
            ok = np.isfinite(numbers)
            blocks.append(numbers[:, None])
            names.append(col)
        if not ok.all():
            if not drop_missing:
                row = int(np.argmin(ok))
                value = table.values[col][row]
                what = ("missing (empty or a missing marker such as '?', 'NA', 'NaN')" if value is None
                        else f"not a finite number ({value!r})")
                raise DataError(f"{table.path}, line {table.lines[row]} (data row {row}): feature column {col!r} is "
                                f"{what}; fill it in, or pass --drop-missing to drop such rows")
            present &= ok
    keep = np.nonzero(present)[0]
    dropped = [table.lines[i] for i in np.nonzero(~present)[0]]
    if dropped:
        LOG.warning("%s: dropped %d of %d rows with a missing feature (first at line %d)", table.path,
                    len(dropped), n, dropped[0])
    if keep.size == 0:
        raise DataError(f"{table.path}: every row has a missing feature; nothing is left to write")
    x = np.concatenate(blocks, axis=1)[keep]
    mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    if standardize:
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        constant = std == 0
        if constant.any():
            LOG.warning("%s: constant feature columns %s become all zeros after standardising", table.path,
                        [names[j] for j in np.nonzero(constant)[0]])
        std[constant] = 1.0
        x = (x - mean) / std
    missing_counts: dict[str, int] = {}
    warnings: list[str] = []
    attrs, attribute_names = {}, {}
    for col in protected:
        values = [table.values[col][i] for i in keep]
        groups = sorted_values(values)
        if not groups:
            raise DataError(f"{table.path}: protected column {col!r} has no values; choose another column")
        if len(groups) > np.iinfo(np.int16).max:
            raise DataError(f"{table.path}: protected column {col!r} has {len(groups)} distinct values; a protected "
                            "attribute must be a small set of groups")
        if len(groups) == 1:
            warnings.append(f"protected column {col!r} has a single group ({groups[0]!r}) in the rows kept: "
                            "every clustering is trivially balanced for it; check the column (or the --limit)")
            LOG.warning("%s: %s", table.path, warnings[-1])
        attrs[col] = _codes(values, groups, np.int16)
        attribute_names[col] = groups
        missing_counts[col] = int((attrs[col] == UNKNOWN).sum())
        if missing_counts[col]:
            LOG.warning("%s: %d rows have no %r value; their group is unknown (-1)", table.path,
                        missing_counts[col], col)
    identity, identity_names = np.full(keep.size, UNKNOWN, np.int64), None
    if label is not None:
        values = [table.values[label][i] for i in keep]
        identity_names = sorted_values(values)
        identity = _codes(values, identity_names, np.int64)
        missing_counts[label] = int((identity == UNKNOWN).sum())
    return TableData(emb=x.astype(np.float32), feature_names=names, identity=identity, identity_names=identity_names,
                     attrs=attrs, attribute_names=attribute_names, mean=mean, std=std, dropped_lines=dropped,
                     missing_counts=missing_counts, skipped_columns=skipped, warnings=warnings)


def load_table(path: str | Path, protected: str | Sequence[str], label: str | None = None, *,
               sep: str | None = None, limit: int | None = None, **options: Any) -> TableData:
    """``read_table`` then ``table_arrays`` (options as there): the arrays in memory."""
    return table_arrays(read_table(path, sep=sep, limit=limit), protected, label, **options)


def _file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _finite_list(values: np.ndarray) -> list[float]:
    return [float(v) if math.isfinite(v) else None for v in values]


def write_table_shards(out_dir: str | Path, path: str | Path, protected: str | Sequence[str], label: str | None = None,
                       features: Sequence[str] | None = None, exclude: Sequence[str] = (), one_hot: bool = False,
                       standardize: bool = True, drop_missing: bool = False, sep: str | None = None,
                       limit: int | None = None, shard_rows: int = 65536, block_rows: int = 4096, workers: int = 1,
                       prefix: str = "table") -> Manifest:
    """Write a CSV table as embedding shards (float32, dim = number of feature columns).

    Options as in ``table_arrays``; ``limit`` reads only the first rows. The manifest's ``source``
    records the file (and its sha256), the feature names with their means and deviations, the
    label's code -> name table, dropped rows and missing protected values.
    """
    table = read_table(path, sep=sep, limit=limit)
    data = table_arrays(table, protected, label, features=features, exclude=exclude, one_hot=one_hot,
                        standardize=standardize, drop_missing=drop_missing)
    source: dict[str, Any] = {
        "source": "table", "path": str(Path(path).resolve()), "sha256": _file_sha256(str(path)), "sep": table.sep,
        "limit": limit, "rows_read": len(table), "dropped_rows": len(data.dropped_lines),
        "dropped_lines_first": data.dropped_lines[:20], "features": data.feature_names, "one_hot": one_hot,
        "standardize": standardize, "feature_mean": _finite_list(data.mean), "feature_std": _finite_list(data.std),
        "protected": list(data.attribute_names), "label": label, "identity_names": data.identity_names,
        "missing": data.missing_counts, "skipped_columns": data.skipped_columns, "warnings": data.warnings,
    }
    LOG.info("%s: %d rows, %d features, groups %s", path, len(data.identity), len(data.feature_names),
             data.attribute_names)
    return write_embedding_shards(out_dir, data.emb, data.identity, data.attrs, data.attribute_names,
                                  shard_rows=shard_rows, block_rows=block_rows, dtype="float32", workers=workers,
                                  source=source, prefix=prefix)


# --------------------------------------------------------------------------- command line

def _column_list(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-fair shards table`` (with the common ``--out``, ``--shard-rows``, ``--workers``)."""
    from dist_fair.data.cli import add_common_arguments

    parser.add_argument("--path", required=True, help="CSV file with a header row")
    parser.add_argument("--protected", required=True, type=_column_list,
                        help="protected column(s), comma-separated (e.g. sex or sex,race)")
    parser.add_argument("--label", default=None, help="column stored as the identity (integer codes), e.g. income")
    parser.add_argument("--features", type=_column_list, default=None,
                        help="feature columns, comma-separated (default: all numeric columns except protected "
                             "and label; with --one-hot also the categorical ones)")
    parser.add_argument("--exclude", type=_column_list, default=[], help="columns to leave out of the default features")
    parser.add_argument("--one-hot", action="store_true", help="encode categorical features as 0/1 columns")
    parser.add_argument("--no-standardize", dest="standardize", action="store_false",
                        help="keep raw feature values (default: z-score every feature column)")
    parser.add_argument("--drop-missing", action="store_true",
                        help="drop rows with a missing feature value (default: fail naming the row)")
    parser.add_argument("--sep", default=None, help="field separator (default: detected from the header)")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N data rows")
    add_common_arguments(parser)
    parser.add_argument("--block-rows", type=int, default=4096, help="rows per tar sample")
    parser.add_argument("--prefix", default="table", help="shard file name prefix")


def run_table(args: argparse.Namespace) -> Manifest:
    return write_table_shards(args.out, args.path, args.protected, label=args.label, features=args.features,
                              exclude=args.exclude, one_hot=args.one_hot, standardize=args.standardize,
                              drop_missing=args.drop_missing, sep=args.sep, limit=args.limit,
                              shard_rows=args.shard_rows, block_rows=args.block_rows, workers=args.workers,
                              prefix=args.prefix)
