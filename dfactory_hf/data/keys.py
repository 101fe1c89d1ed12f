"""What a training batch's items carry besides the document: its epoch (the noise seed) and its planned row.

The diffusion noise of a document is a pure function of (seed, epoch, sample_index) (collators.py). The epoch used to
be pushed into the collator at every epoch start, which a DataLoader worker never sees again once it has copied the
collator (`dataloader_persistent_workers`). Instead the samplers yield `DocumentKey`s: dataset indices (ints, so
anything indexing with them works unchanged) that carry the epoch they were drawn in and, in packing mode, the row of
the micro-batch the token-budget sampler planned for them. `KeyedDataset` copies both into the feature it fetches
(`epoch`, `row`), in the worker, so the collator needs no state that changes during training.

- token-budget path: `TokenBudgetBatchSampler` yields the keys itself;
- padded path: accelerate replaces Trainer's RandomSampler by its SeedableRandomSampler when it prepares the
  DataLoader; `EpochKeys` then wraps that one in place (the trainer's `get_train_dataloader`), so the order is the
  one accelerate draws, and Trainer's `set_epoch` reaches both.
"""

from __future__ import annotations

import torch


class DocumentKey(int):
    """A dataset index with the epoch it was drawn in and, in packing mode, its row (None: no planned row)."""

    epoch: int
    row: int | None

    def __new__(cls, index: int, epoch: int, row: int | None = None):
        key = super().__new__(cls, index)
        key.epoch, key.row = epoch, row
        return key

    def __reduce__(self):  # through the DataLoader's index queue to the workers
        return DocumentKey, (int(self), self.epoch, self.row)


class KeyedDataset(torch.utils.data.Dataset):
    """The training documents, fetched by `DocumentKey`: each feature gains `epoch` (and `row` where planned)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[dict]:
        indices = [int(key) for key in keys]
        if hasattr(self.dataset, "__getitems__"):
            features = self.dataset.__getitems__(indices)
        else:
            features = [self.dataset[index] for index in indices]
        for feature, key in zip(features, keys):
            if isinstance(key, DocumentKey):
                feature["epoch"] = key.epoch
                if key.row is not None:
                    feature["row"] = key.row
        return features


class EpochKeys(torch.utils.data.Sampler):
    """A sampler's indices as `DocumentKey`s of the epoch that `set_epoch` (Trainer, accelerate) last named."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = getattr(sampler, "epoch", 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.epoch
        return (DocumentKey(index, epoch) for index in self.sampler)
