"""Reading local data files into rows, with errors that name the file and line.

``datasets`` reports an empty JSONL file as a bare ``StopIteration`` and a broken line as "at
position 48" of some buffer; when a file cannot be read we parse it ourselves to say which
file, which line and what is wrong there. Each row keeps its place in its file (``ROW_COLUMN``),
so a bad row found after shuffling and splitting is still reported as file and line.

Images that ``datasets`` wrote into a Parquet file (its ``Image`` feature, recorded in the file's
metadata) are read undecoded, as ``{"bytes", "path"}``: a broken one is then a bad row with its
place, not a crash while reading, and the pixels are made per batch (data/images.py).
"""

import json
from pathlib import Path

import datasets
import pyarrow.parquet

from llm_finetune.data.rows import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROW_COLUMN = "_source_row"  # the row's index over all files, in file order


class RowSource:
    """Turns a row's index over several files back into "file line N"."""

    def __init__(self, files: list[str], counts: list[int]):
        self.files, self.counts = files, counts

    def file_of(self, index: int) -> str:
        """The file that row ``index`` (over all files) was read from."""
        for file, count in zip(self.files, self.counts):
            if index < count:
                return file
            index -= count
        return self.files[-1]

    def where(self, index: int) -> str:
        for file, count in zip(self.files, self.counts):
            if index < count:
                return place_in_file(file, index)
            index -= count
        return f"row {index}"


def place_in_file(file: str, index: int) -> str:
    suffix = Path(file).suffix
    if suffix == ".jsonl":
        return f"{file} line {jsonl_line(file, index)}"
    if suffix == ".csv":
        return f"{file} row {index + 1} after the header"
    if suffix == ".json":
        return f"{file} record {index}"
    return f"{file} row {index}"


def jsonl_line(file: str, index: int) -> int:
    """Line number (from 1) of the ``index``-th non-blank line: the row ``datasets`` read."""
    with open(file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                if index == 0:
                    return number
                index -= 1
    return 0


def json_problem(file: str) -> str | None:
    """Where a JSON or JSONL file stops being valid, as "file line N: reason"; None if it
    parses (then ``datasets`` failed for another reason)."""
    text = Path(file).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return f"{file} is empty: it holds no rows"
    if Path(file).suffix == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # else JSON lines in a .json file: check line by line
                return f"{file} line {error.lineno}: {error.msg} (column {error.colno})"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return f"{file} line {number}: not valid JSON ({error.msg}, column {error.colno})"
        if not isinstance(row, dict):
            return f"{file} line {number}: a JSON {type(row).__name__}, not an object of fields"
    return None


def undecoded(feature):
    """``feature`` with every ``Image`` in it left undecoded (``{"bytes", "path"}``)."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, dict):
        return type(feature)({name: undecoded(inner) for name, inner in feature.items()})
    if isinstance(feature, datasets.LargeList):
        return datasets.LargeList(undecoded(feature.feature))
    if isinstance(feature, datasets.List):
        return datasets.List(undecoded(feature.feature), length=feature.length)
    return feature


def parquet_features(file: str) -> datasets.Features | None:
    """The features ``datasets`` recorded in a Parquet file, its images undecoded; None when
    it recorded no images (then the file is read as it always is)."""
    try:
        schema = pyarrow.parquet.read_schema(file)
    except Exception:  # not Parquet: load_dataset says so with the file's name
        return None
    if b"huggingface" not in (schema.metadata or {}):
        return None
    recorded = datasets.Features.from_arrow_schema(schema)
    features = undecoded(recorded)
    return features if features != recorded else None


def read_one(kind: str, file: str, setting: str) -> datasets.Dataset:
    features = parquet_features(file) if kind == "parquet" else None
    try:
        return datasets.load_dataset(kind, data_files=[file], split="train", features=features)
    except Exception as error:  # datasets wraps the reader's error, or raises StopIteration
        problem = json_problem(file) if kind == "json" else None
        if problem is None:
            cause = error.__cause__ or error
            if Path(file).stat().st_size == 0:
                problem = f"{file} is empty: it holds no rows"
            else:
                problem = f"{file}: cannot be read as {kind} ({type(cause).__name__}: {cause})"
        raise DataError(f"{setting}: {problem}. Fix the file or leave it out") from None


def read_rows(files: list[str], setting: str) -> tuple[datasets.Dataset, RowSource]:
    """The rows of ``files`` (one format) in order, each with its ``ROW_COLUMN``."""
    kinds = set()
    for file in files:
        if not Path(file).is_file():
            raise DataError(f"{setting}: {file}: no such file")
        if Path(file).suffix not in BUILDERS:
            raise DataError(f"{file}: unknown format {Path(file).suffix!r}; use one of "
                            f"{', '.join(BUILDERS)}")
        kinds.add(BUILDERS[Path(file).suffix])
    if len(kinds) > 1:
        raise DataError(f"{setting} mixes formats ({', '.join(sorted(kinds))}); "
                        "give files of one format")
    kind = kinds.pop()
    parts = [read_one(kind, file, setting) for file in files]
    rows = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(rows) == 0:
        raise DataError(f"{setting}: {', '.join(files)} holds no rows")
    rows = rows.add_column(ROW_COLUMN, list(range(len(rows))))
    return rows, RowSource(files, [len(p) for p in parts])


def require_columns(rows: datasets.Dataset, columns: dict[str, str], source: str) -> None:
    """Every needed column is in the data: ``columns`` maps a column to the setting naming it."""
    present = [c for c in rows.column_names if c != ROW_COLUMN]
    for column, setting in columns.items():
        if column not in present:
            raise DataError(f"{source}: no column {column!r} (its columns: {', '.join(present)})"
                            f": rename it in the data or set {setting}")
