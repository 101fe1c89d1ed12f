"""`--dataset_path` -> a `DatasetDict`, with a file's problems named by file and line.

datasets reads json / jsonl / parquet files and `save_to_disk` folders; when a file is wrong it fails from deep
inside its JSON builder (an empty file raises a bare `StopIteration`, a malformed line an Arrow parse error with
the line number buried in a long traceback). Here the file is read by datasets as usual and only when that fails
is it read again line by line to say which line is wrong and why, so a valid file costs nothing extra.

A field whose rows disagree on the type (a number in one row, a string in another; content a string here, a list
of parts there) is refused too, naming both lines: datasets keeps such a column as JSON and decodes every value
(the content "3" becomes the number 3), so valid rows would be dropped for a type they do not have.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import DatasetDict, load_dataset, load_from_disk
from datasets.features import Json

KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_data_file(path: str | Path, *, split: str = "train", flag: str = "--dataset_path") -> DatasetDict:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{flag} ({path}) does not exist; pass a .json, .jsonl or .parquet file, or a folder saved "
                         "by Dataset.save_to_disk.")
    if path.is_dir():
        try:
            data = load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as error:
            raise ValueError(f"{flag} ({path}) is a folder but not one written by Dataset.save_to_disk ({error}); "
                             "pass the data file itself, or a save_to_disk folder.") from error
        return data if isinstance(data, DatasetDict) else DatasetDict({split: data})
    kind = KINDS.get(path.suffix)
    if kind is None:
        raise ValueError(f"{flag} ({path}) must be .json, .jsonl, .parquet or a save_to_disk folder.")
    if kind == "json" and not path.read_bytes().strip():
        raise ValueError(f"{flag} ({path}) is empty; it needs at least one row (one JSON object per line).")
    try:
        data = load_dataset(kind, data_files=str(path))
    except Exception as error:  # datasets wraps the reader's errors in its own types
        problem = json_problem(path) if kind == "json" else None
        if problem is None:
            raise ValueError(f"{flag} ({path}) could not be read as {kind}: {_first_line(error)}") from error
        raise ValueError(f"{flag}: {problem}") from error
    mixed = [name for name, feature in _json_fields(data["train"].features)]
    if kind == "json" and mixed:
        raise ValueError(f"{flag}: {type_conflict(path, mixed[0])}")
    return data if isinstance(data, DatasetDict) else DatasetDict({split: data})


def _json_fields(features, prefix: str = ""):
    """(field path, feature) of every field datasets could only type as JSON (its rows disagree on the type)."""
    items = features.items() if isinstance(features, dict) else []
    for name, feature in items:
        path = f"{prefix}{name}"
        if isinstance(feature, Json):
            yield path, feature
        elif isinstance(feature, dict):
            yield from _json_fields(feature, path + ".")
        elif hasattr(feature, "feature"):  # List / Sequence
            inner = feature.feature
            if isinstance(inner, Json):
                yield path + "[]", inner
            else:
                yield from _json_fields(inner if isinstance(inner, dict) else {}, path + "[].")


def type_conflict(path: Path, field: str) -> str:
    """`file:line: field is a <type> here but a <type> at line <n>; the fix`, for the first disagreeing line."""
    first: tuple[str, int] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        for value in _values_at(json.loads(line), field.split(".")):
            kind = _json_type(value)
            if kind is None:
                continue
            if first is None:
                first = (kind, number)
            elif kind != first[0]:
                return (f"{path}:{number}: `{field}` is a {kind} here but a {first[0]} at line {first[1]}; datasets "
                        "would convert one into the other (the string \"3\" becomes the number 3), so give it one "
                        "type in every row")
    return f"{path}: the rows disagree on the type of `{field}`; give it one type in every row"


def _values_at(value, parts: list[str]):
    if not parts:
        yield value
        return
    name, rest = parts[0], parts[1:]
    many = name.endswith("[]")
    name = name.removesuffix("[]")
    if not isinstance(value, dict) or value.get(name) is None:
        return
    inner = value[name]
    for item in (inner if many and isinstance(inner, list) else [inner]):
        yield from _values_at(item, rest)


def _json_type(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}[type(value)]


def json_problem(path: Path) -> str | None:
    """`file:line: what is wrong; the fix` for the first bad line of a JSON-lines file (or a bad JSON document)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    if isinstance(document, list):  # one JSON array of rows
        for index, row in enumerate(document):
            if not isinstance(row, dict):
                return f"{path}: item {index} of the JSON array is {type(row).__name__}, not an object (one row)"
        return None
    if isinstance(document, dict):
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return (f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}); fix or remove the line "
                    "(each line must be one JSON object)")
        if not isinstance(row, dict):
            return f"{path}:{number}: the line is a JSON {type(row).__name__}, not an object; each line must be one row"
    return None


def _first_line(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__ or error
    return (str(cause) or type(cause).__name__).splitlines()[0]
