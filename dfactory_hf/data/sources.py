"""Training data from one source or a weighted mixture of several, and the held-out split made when the data has
none.

A mixture is TRL's `DatasetMixtureConfig` (the `datasets:` list of a recipe, each entry `path`, `name`,
`data_dir`, `data_files`, `split`, `columns`, `fraction`), so a TRL recipe's data section works unchanged. Two
things are ours, and why:
- local paths go through `load_data_file` (its file:line errors, shard folders, save_to_disk folders), hub ids
  through `datasets.load_dataset`, each source named in errors by its place in the list;
- `fraction` keeps TRL's rule for the sizes (shares of the mixture, capped so no source is oversampled) but picks
  each source's rows by a seeded shuffle, where TRL keeps the first rows (a file sorted by length or topic would
  give a biased share). The mixture is then one map-style dataset: the train sampler's seeded shuffle interleaves
  the sources, and its resume restores the position.
The held-out split is seeded too (TRL's `test_split_size` split is not).

With `streaming: true` every source is read as a `datasets.IterableDataset` (`load_stream`) and the mixture
interleaves them (`datasets.interleave_datasets`, probabilities from `fraction`, seeded; TRL's get_dataset
concatenates, which would train on one source after the other), stopping at the first source's end so that no
source repeats; without fractions the sources follow one another. A stream's held-out split is its first
`eval_split_size` rows (a row count), read once into memory (`hold_out_stream`).
"""

from __future__ import annotations

import math
from pathlib import Path

from datasets import (Dataset, DatasetDict, IterableDataset, IterableDatasetDict, concatenate_datasets,
                      interleave_datasets, load_dataset, load_from_disk)

from ..paths import load_pretrained
from .files import KINDS, data_shards, load_data_file


def load_source(path: str, *, flag: str, split: str = "train", name: str | None = None,
                data_dir: str | None = None, data_files=None) -> DatasetDict:
    """A local file / folder (`load_data_file`) or a dataset on the hub (`datasets.load_dataset`)."""
    local = Path(path).expanduser()
    if local.exists() and name is None and data_dir is None and data_files is None:
        return load_data_file(local, split=split, flag=flag)
    if path.startswith((".", "/", "~")) and not local.exists():
        raise ValueError(f"{flag} ({path}) does not exist; check the path.")
    data = load_pretrained(flag, path, load_dataset, name=name, data_dir=data_dir, data_files=data_files)
    return data if isinstance(data, DatasetDict) else DatasetDict({split: data})


def load_stream(path: str, *, flag: str, split: str = "train", name: str | None = None,
                data_dir: str | None = None, data_files=None) -> IterableDataset:
    """`load_source`'s data as a stream: a local file / folder of shards read lazily, a save_to_disk folder as an
    iterable view of it, a hub dataset with `streaming=True`."""
    local = Path(path).expanduser()
    if local.exists() and name is None and data_dir is None and data_files is None:
        files = data_shards(local) if local.is_dir() else [local]
        if local.is_dir() and not files:  # a save_to_disk folder
            saved = load_from_disk(str(local))
            saved = saved[split] if isinstance(saved, DatasetDict) and split in saved else saved
            if isinstance(saved, DatasetDict):
                raise ValueError(f"{flag} ({path}) has no split {split} (splits: {', '.join(saved)}).")
            return saved.to_iterable_dataset()
        kinds = sorted({KINDS.get(file.suffix, file.suffix) for file in files})
        if len(kinds) > 1 or kinds[0] not in KINDS.values():
            raise ValueError(f"{flag} ({path}) must be .json, .jsonl or .parquet files of one kind (found "
                             f"{', '.join(kinds)}).")
        return load_dataset(kinds[0], data_files=[str(file) for file in files], split="train", streaming=True)
    if path.startswith((".", "/", "~")) and not local.exists():
        raise ValueError(f"{flag} ({path}) does not exist; check the path.")
    return load_pretrained(flag, path, load_dataset, name=name, data_dir=data_dir, data_files=data_files, split=split,
                           streaming=True)


def stream_mixture(mixture, *, seed: int) -> IterableDataset:
    """A streaming `DatasetMixtureConfig`: the sources interleaved by `fraction` (module docstring)."""
    sources = []
    for index, config in enumerate(mixture.datasets):
        source = load_stream(config.path, flag=f"datasets[{index}].path", split=config.split, name=config.name,
                             data_dir=config.data_dir, data_files=config.data_files)
        if config.columns is not None:
            source = source.select_columns(config.columns)
        sources.append(source)
    if len(sources) == 1:
        return sources[0]
    fractions = [config.fraction for config in mixture.datasets]
    if all(fraction is None for fraction in fractions):
        return concatenate_datasets(sources)
    _mixture_sizes(mixture, [1] * len(sources))  # the same checks of `fraction` as map-style
    probabilities = [fraction / sum(fractions) for fraction in fractions]
    return interleave_datasets(sources, probabilities=probabilities, seed=seed, stopping_strategy="first_exhausted")


def hold_out_stream(stream: IterableDataset, *, size: float, flag: str) -> tuple[IterableDataset, Dataset | None]:
    """(the training stream, its first `size` rows as the held-out Dataset); size 0: (stream, None)."""
    if size == 0:
        return stream, None
    if size < 1:
        raise ValueError(f"{flag} ({size:g}) is a share of the training rows, which a stream does not know: give a "
                         "row count (e.g. 200: the stream's first 200 rows are held out) or 0 (no evaluation).")
    rows = list(stream.take(int(size)))
    if len(rows) < size:
        raise ValueError(f"{flag} ({size:g}) holds out more rows than the stream has ({len(rows)}); pass fewer, or 0.")
    return stream.skip(int(size)), Dataset.from_list(rows)


def load_mixture(mixture, *, seed: int, split: str = "train") -> DatasetDict | IterableDatasetDict:
    """TRL's `DatasetMixtureConfig` -> DatasetDict({split: the mixture}); with `streaming: true`,
    IterableDatasetDict({split: `stream_mixture`})."""
    if mixture.streaming:
        return IterableDatasetDict({split: stream_mixture(mixture, seed=seed)})
    sources = []
    for index, config in enumerate(mixture.datasets):
        flag = f"datasets[{index}] ({config.path})"
        data = load_source(config.path, flag=f"datasets[{index}].path", split=config.split, name=config.name,
                           data_dir=config.data_dir, data_files=config.data_files)
        if config.split not in data:
            raise ValueError(f"datasets[{index}].split ({config.split}) is not a split of {config.path} (splits: "
                             f"{', '.join(data)}); set `split:` to one of them.")
        source = data[config.split]
        if config.columns is not None:
            missing = [column for column in config.columns if column not in source.column_names]
            if missing:
                raise ValueError(f"datasets[{index}].columns: {', '.join(missing)} not in {config.path} (columns: "
                                 f"{', '.join(source.column_names)}).")
            source = source.select_columns(config.columns)
        if len(source) == 0:
            raise ValueError(f"{flag} has no rows in split {config.split}; remove it from `datasets:`.")
        sources.append(source)
    sizes = _mixture_sizes(mixture, [len(source) for source in sources])
    picked = [source if size == len(source) else source.shuffle(seed=seed + index).select(range(size))
              for index, (source, size) in enumerate(zip(sources, sizes))]
    return DatasetDict({split: _concatenate(picked, mixture)})


def _mixture_sizes(mixture, lengths: list[int]) -> list[int]:
    """Rows taken from each source: all of them, or TRL's `fraction` rule (shares of the mixture, the mixture as
    large as possible without repeating a row)."""
    fractions = [config.fraction for config in mixture.datasets]
    if all(fraction is None for fraction in fractions):
        return lengths
    for index, fraction in enumerate(fractions):
        if fraction is None:
            raise ValueError(f"datasets[{index}].fraction is unset while another source sets one; set `fraction:` "
                             "on every source of the mixture, or on none.")
        if not (math.isfinite(fraction) and fraction >= 0):
            raise ValueError(f"datasets[{index}].fraction ({fraction}) must be >= 0 (a share of the mixture).")
    if sum(fractions) <= 0:
        raise ValueError(f"datasets[*].fraction ({fractions}) sum to 0; give at least one source a share.")
    weights = [fraction / sum(fractions) for fraction in fractions]
    total = min(length / weight for length, weight in zip(lengths, weights) if weight > 0)
    return [min(length, round(weight * total)) for length, weight in zip(lengths, weights)]


def _concatenate(sources: list[Dataset], mixture) -> Dataset:
    columns = [set(source.column_names) for source in sources]
    if any(c != columns[0] for c in columns):
        described = "; ".join(f"{config.path}: {', '.join(sorted(c))}" for config, c in zip(mixture.datasets, columns))
        raise ValueError(f"the sources of `datasets:` have different columns ({described}); give every source the "
                         "same form of rows, or pick the shared ones with `columns:`.")
    try:
        return concatenate_datasets([source.select_columns(sorted(columns[0])) for source in sources])
    except ValueError as error:  # the same columns with other types (datasets' cast error)
        raise ValueError(f"the sources of `datasets:` cannot be joined ({str(error).splitlines()[0]}); give every "
                         "source the same form of rows.") from error


def hold_out(data: DatasetDict, *, size: float, train_split: str, test_split: str, seed: int) -> DatasetDict:
    """Split `size` of the train split off as `test_split` when the data has no such split: a fraction in (0, 1)
    or a number of rows >= 1; 0 keeps everything for training."""
    if test_split in data or size == 0:
        return data
    train = data[train_split]
    rows = math.ceil(size * len(train)) if size < 1 else int(size)
    if rows >= len(train):
        raise ValueError(f"--eval_split_size ({size:g}) would hold out {rows} of the {len(train)} training rows; "
                         "pass a smaller fraction or row count, or 0 to train on every row without evaluation.")
    split = train.train_test_split(test_size=rows, seed=seed)
    return DatasetDict({**data, train_split: split["train"], test_split: split["test"]})


def check_eval_split_size(size: float) -> None:
    if not (math.isfinite(size) and size >= 0 and (size < 1 or float(size).is_integer())):
        raise ValueError(f"--eval_split_size ({size}) must be a fraction in [0, 1) of the training rows or a whole "
                         "number of rows >= 1; 0 disables the held-out split.")
