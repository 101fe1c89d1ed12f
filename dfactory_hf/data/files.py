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
    """A json / jsonl / parquet file, a folder of such files (shards of one kind, read in name order), or a
    folder written by `save_to_disk`."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{flag} ({path}) does not exist; pass a .json, .jsonl or .parquet file, a folder of such "
                         "files, or a folder saved by Dataset.save_to_disk.")
    if path.is_dir():
        shards = data_shards(path)
        if not shards:
            return _load_saved(path, split=split, flag=flag)
        kinds = sorted({KINDS[shard.suffix] for shard in shards})
        if len(kinds) > 1:
            raise ValueError(f"{flag} ({path}) holds data files of more than one kind ({', '.join(kinds)}); keep one "
                             "kind of file in the folder, or give each kind as its own source (`datasets:` list).")
        return DatasetDict({split: _read(kinds[0], shards, flag)})
    kind = KINDS.get(path.suffix)
    if kind is None:
        raise ValueError(f"{flag} ({path}) must be .json, .jsonl, .parquet, a folder of such files or a save_to_disk "
                         "folder.")
    return DatasetDict({split: _read(kind, [path], flag)})


def data_shards(folder: Path) -> list[Path]:
    """The data files under a folder (any depth), in name order; none for a `save_to_disk` folder, whose Arrow
    files and json metadata are not rows."""
    if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in KINDS and not p.name.startswith("."))


def _load_saved(path: Path, *, split: str, flag: str) -> DatasetDict:
    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as error:
        raise ValueError(f"{flag} ({path}) is a folder with no .json, .jsonl or .parquet file and not one written by "
                         f"Dataset.save_to_disk ({error}); pass a data file, a folder of data files, or a "
                         "save_to_disk folder.") from error
    return data if isinstance(data, DatasetDict) else DatasetDict({split: data})


def _read(kind: str, files: list[Path], flag: str):
    """The rows of `files` (one kind), every file's problem named by file and line."""
    for file in files:
        if kind == "json" and not file.read_bytes().strip():
            raise ValueError(f"{flag} ({file}) is empty; it needs at least one row (one JSON object per line).")
    try:
        data = load_dataset(kind, data_files=[str(file) for file in files], split="train")
    except Exception as error:  # datasets wraps the reader's errors in its own types
        problems = [json_problem(file) for file in files] if kind == "json" else []
        problem = next((p for p in problems if p is not None), None)
        if problem is None:
            where = files[0] if len(files) == 1 else f"{len(files)} files under {files[0].parent}"
            raise ValueError(f"{flag} ({where}) could not be read as {kind}: {_first_line(error)}") from error
        raise ValueError(f"{flag}: {problem}") from error
    mixed = [name for name, feature in _json_fields(data.features)]
    if kind == "json" and mixed:
        raise ValueError(f"{flag}: {type_conflict(files, mixed[0])}")
    return data


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


def type_conflict(files: list[Path], field: str) -> str:
    """`file:line: field is a <type> here but a <type> at <file:line>; the fix`, for the first disagreeing line
    (the rows of every file together make one column)."""
    first: tuple[str, str] | None = None
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            for value in _values_at(json.loads(line), field.split(".")):
                kind = _json_type(value)
                if kind is None:
                    continue
                if first is None:
                    first = (kind, f"line {number}" if len(files) == 1 else f"{path}:{number}")
                elif kind != first[0]:
                    return (f"{path}:{number}: `{field}` is a {kind} here but a {first[0]} at {first[1]}; datasets "
                            "would convert one into the other (the string \"3\" becomes the number 3), so give it "
                            "one type in every row")
    return f"{files[0]}: the rows disagree on the type of `{field}`; give it one type in every row"


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
