"""`--dataset_path` -> a `DatasetDict`, with a file's problems named by file and line.

datasets reads json / jsonl / parquet files and `save_to_disk` folders; when a file is wrong it fails from deep
inside its JSON builder (an empty file raises a bare `StopIteration`, a malformed line an Arrow parse error with
the line number buried in a long traceback). Here the file is read by datasets as usual and only when that fails
is it read again line by line to say which line is wrong and why, so a valid file costs nothing extra.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import DatasetDict, load_dataset, load_from_disk

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
    return data if isinstance(data, DatasetDict) else DatasetDict({split: data})


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
