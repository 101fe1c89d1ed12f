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
"""

from __future__ import annotations

import math
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset

from ..paths import load_pretrained
from .files import load_data_file


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


def load_mixture(mixture, *, seed: int, split: str = "train") -> DatasetDict:
    """TRL's `DatasetMixtureConfig` -> DatasetDict({split: the mixture})."""
    if mixture.streaming:
        raise ValueError("--streaming (true) is not supported yet: the token-budget sampler plans from the lengths "
                         "of every row; drop `streaming`, or load the data map-style (datasets caches it on disk).")
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
