"""Collators: the batch contract of docs/design.md, per-document seeded noise, packing, given noise."""

from collections import Counter

import pytest
import torch

from dfactory_hf.data.collators import (
    IGNORE_INDEX,
    NoisedDocument,
    PackingCollator,
    PaddingCollator,
    PositionIdCollator,
    pack_best_fit,
)
from dfactory_hf.data.preprocessing import prepare_dataset
from dfactory_hf.demo.arithmetic import make_arithmetic_dataset
from dfactory_hf.demo.tokenizer import load_demo_tokenizer

PAD, EOS, MASK = 0, 1, 2
BLOCK = 4
KEYS = {"input_ids", "noisy_input_ids", "labels", "position_ids", "attention_mask", "mask_rate", "noise_kind"}
DTYPES = {"mask_rate": torch.float32, "noise_kind": torch.int8}
FLASH_KEYS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


def feature(sample_index: int, prompt_length: int, length: int) -> dict:
    """A hand-built document: distinct random ids in [7, 103) (never pad, EOS or mask), seeded by its index."""
    generator = torch.Generator().manual_seed(1000 + sample_index)
    ids = torch.randint(7, 103, (length,), generator=generator).tolist()
    return {"input_ids": ids, "prompt_length": prompt_length, "sample_index": sample_index}


FEATURES = [feature(0, 5, 16), feature(1, 2, 8), feature(2, 9, 32), feature(3, 0, 12)]


def collator(cls, **kwargs):
    return cls(mask_token_id=MASK, pad_token_id=PAD, block_size=kwargs.pop("block_size", BLOCK), **kwargs)


def segments(batch) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document, recovered from position_ids == 0 among real tokens."""
    found = []
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        starts = ((batch["position_ids"][row] == 0) & real).nonzero().flatten().tolist()
        ends = starts[1:] + [int(real.sum())]
        found += [(row, start, end) for start, end in zip(starts, ends)]
    return found


def check_contract(batch, features, *, noise_range=(0.3, 0.8), block_size=BLOCK) -> dict[int, list[tuple]]:
    """Assert the design.md batch contract; return sample_index -> [(x_t, labels, mask_rate)] of its documents."""
    assert set(batch) - FLASH_KEYS == KEYS
    num_rows, length = batch["input_ids"].shape
    assert length % block_size == 0
    for key in KEYS:
        assert batch[key].shape == (num_rows, length), key
        assert batch[key].dtype == DTYPES.get(key, torch.long), key
    x_0, x_t, labels = batch["input_ids"], batch["noisy_input_ids"], batch["labels"]
    real = batch["attention_mask"].bool()
    assert set(batch["attention_mask"].unique().tolist()) <= {0, 1}
    # Real tokens of a row come first, row padding after.
    assert torch.equal(real, torch.arange(length) < real.sum(1, keepdim=True))
    masked = x_t == MASK
    assert torch.equal(labels[masked], x_0[masked])
    assert (labels[~masked] == IGNORE_INDEX).all()
    assert torch.equal(x_t[~masked], x_0[~masked])
    assert not (masked & ~real).any()
    assert torch.equal(batch["noise_kind"], masked.to(torch.int8))  # no edit stream here: 1 exactly where masked
    for key, value in (("input_ids", PAD), ("noisy_input_ids", PAD), ("labels", IGNORE_INDEX),
                       ("position_ids", 0), ("mask_rate", 0.0), ("noise_kind", 0)):
        assert (batch[key][~real] == value).all(), key

    by_content = {tuple(f["input_ids"]): f for f in features}
    documents: dict[int, list[tuple]] = {}
    for row, start, end in segments(batch):
        assert (end - start) % block_size == 0
        assert torch.equal(batch["position_ids"][row, start:end], torch.arange(end - start))
        doc = by_content[tuple(x_0[row, start:end].tolist())]
        prompt_length = doc["prompt_length"]
        assert not masked[row, start:start + prompt_length].any(), "a prompt token was masked"
        rates = batch["mask_rate"][row, start:end]
        assert (rates == rates[0]).all()
        if noise_range is not None:
            assert noise_range[0] <= float(rates[0]) <= noise_range[1]
        documents.setdefault(doc["sample_index"], []).append(
            (x_t[row, start:end].clone(), labels[row, start:end].clone(), float(rates[0])))
    assert sum(len(docs) for docs in documents.values()) == len(segments(batch))
    return documents


# --- the batch contract ------------------------------------------------------------------------------------------


def test_padding_collator_pads_to_the_longest_document():
    batch = collator(PaddingCollator)(FEATURES)
    documents = check_contract(batch, FEATURES)
    assert batch["input_ids"].shape == (4, 32)
    assert batch["attention_mask"].sum(1).tolist() == [16, 8, 32, 12]
    for row, f in enumerate(FEATURES):  # one document per row, in feature order
        assert batch["input_ids"][row, : len(f["input_ids"])].tolist() == f["input_ids"]
    assert sorted(documents) == [0, 1, 2, 3] and all(len(docs) == 1 for docs in documents.values())
    assert (batch["labels"] != IGNORE_INDEX).sum(1).min() >= 1  # min_masked_tokens=1


def test_padding_collator_pad_to_max_seq_len():
    batch = collator(PaddingCollator, max_seq_len=48, pad_to_max_seq_len=True)(FEATURES[:2])
    check_contract(batch, FEATURES)
    assert batch["input_ids"].shape == (2, 48)
    assert batch["attention_mask"].sum(1).tolist() == [16, 8]


def test_packing_collator_packs_every_document_once_within_max_seq_len():
    features = [feature(i, i % 3, 4 * (1 + i % 5)) for i in range(10)]  # 4..20 tokens, 120 in all
    batch = collator(PackingCollator, max_seq_len=24)(features)
    documents = check_contract(batch, features)
    assert batch["input_ids"].shape[1] <= 24
    assert sorted(documents) == list(range(10)) and all(len(docs) == 1 for docs in documents.values())
    assert int(batch["attention_mask"].sum()) == 120
    # Best fit decreasing pairs 20+4, 20+4, 16+8, 16+8, 12+12: 120 / 24 = 5 full rows.
    assert batch["input_ids"].shape == (5, 24) and batch["attention_mask"].all()
    assert sorted(end - start for _, start, end in segments(batch) if start == 0) == [12, 16, 16, 20, 20]


def test_packing_rows_restart_positions_at_each_document():
    features = [feature(0, 1, 8), feature(1, 1, 4), feature(2, 2, 4)]
    batch = collator(PackingCollator, max_seq_len=16)(features)
    check_contract(batch, features)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["attention_mask"].all()


def test_best_fit_packs_four_halves_into_two_rows():
    features = [feature(i, 1, 8) for i in range(4)]
    batch = collator(PackingCollator, max_seq_len=16)(features)
    check_contract(batch, features)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].all()


def test_best_fit_chooses_the_fullest_row_not_the_first():
    # Lengths 7, 4, 4, 2 into rows of 10: rows [7] and [4, 4]; the 2 fits both and goes to the fuller [4, 4]
    # (first fit would put it after the 7).
    features = [feature(i, 0, length) for i, length in enumerate([7, 4, 2, 4])]
    batch = collator(PackingCollator, block_size=1, max_seq_len=10)(features)
    check_contract(batch, features, block_size=1)
    assert batch["attention_mask"].sum(1).tolist() == [7, 10]
    documents = [NoisedDocument(*(torch.full((n,), n),) * 3, 0.5, torch.zeros(n, dtype=torch.int8))
                 for n in (7, 4, 2, 4)]
    rows = pack_best_fit(documents, 10)
    assert [[len(doc.x_0) for doc in row] for row in rows] == [[7], [4, 4, 2]]


def test_packing_rejects_a_document_longer_than_max_seq_len():
    with pytest.raises(ValueError, match=r"^A document of 32 tokens does not fit a row of max_seq_len=16 tokens\.$"):
        collator(PackingCollator, max_seq_len=16)(FEATURES)


def test_position_id_collator_one_row_without_padding():
    batch = collator(PositionIdCollator)(FEATURES)
    documents = check_contract(batch, FEATURES)
    assert batch["input_ids"].shape == (1, 68) and batch["attention_mask"].all()
    assert batch["input_ids"][0].tolist() == [i for f in FEATURES for i in f["input_ids"]]
    assert sorted(documents) == [0, 1, 2, 3]
    assert not FLASH_KEYS & set(batch)


def test_position_id_collator_flash_attention_kwargs():
    batch = collator(PositionIdCollator, return_flash_attn_kwargs=True)(FEATURES)
    assert set(batch) == KEYS | FLASH_KEYS
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32
        assert batch[key].tolist() == [0, 16, 24, 56, 68]
    assert batch["max_length_q"] == batch["max_length_k"] == 32


def test_document_not_a_multiple_of_block_size_is_rejected():
    bad = {"input_ids": list(range(10, 16)), "prompt_length": 1, "sample_index": 7}
    with pytest.raises(ValueError, match=r"^Document 7 has 6 tokens, not a multiple of block_size \(4\); build "
                                         r"datasets with dfactory_hf\.data\.preprocessing\.prepare_dataset\.$"):
        collator(PaddingCollator)([FEATURES[0], bad])


# --- determinism of the noise ---------------------------------------------------------------------------------


def test_noise_depends_only_on_seed_sample_index_epoch():
    reference = check_contract(collator(PaddingCollator, seed=5)(FEATURES), FEATURES)
    layouts = {
        "reordered": collator(PaddingCollator, seed=5)(FEATURES[::-1]),
        "subset": collator(PaddingCollator, seed=5)([FEATURES[2], FEATURES[0]]),
        "packed": collator(PackingCollator, seed=5, max_seq_len=32)([FEATURES[1], FEATURES[3], FEATURES[2],
                                                                      FEATURES[0]]),
        "one row": collator(PositionIdCollator, seed=5)(FEATURES[1:]),
    }
    for name, batch in layouts.items():
        for index, docs in check_contract(batch, FEATURES).items():
            (x_t, labels, rate), = docs
            (ref_x_t, ref_labels, ref_rate), = reference[index]
            assert torch.equal(x_t, ref_x_t) and torch.equal(labels, ref_labels), (name, index)
            assert rate == ref_rate, (name, index)


def test_sample_index_seeds_the_noise():
    twins = [dict(FEATURES[2], sample_index=index) for index in (2, 40, 41)]  # one document, three indices
    batch = collator(PaddingCollator, seed=5)(twins)
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    rates = batch["mask_rate"][:, 0].tolist()
    assert len(set(rates)) == 3
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.equal(batch["noisy_input_ids"][a], batch["noisy_input_ids"][b])


def test_set_epoch_and_seed_change_the_noise():
    base = collator(PaddingCollator, seed=5)
    reference = base(FEATURES)
    assert torch.equal(base(FEATURES)["noisy_input_ids"], reference["noisy_input_ids"])  # calling is pure
    base.set_epoch(1)
    assert base.epoch == 1
    next_epoch = base(FEATURES)
    other_seed = collator(PaddingCollator, seed=6)(FEATURES)
    for changed in (next_epoch, other_seed):
        assert not torch.equal(changed["noisy_input_ids"], reference["noisy_input_ids"])
        assert not torch.equal(changed["mask_rate"], reference["mask_rate"])
        assert torch.equal(changed["input_ids"], reference["input_ids"])
    base.set_epoch(0)
    assert torch.equal(base(FEATURES)["noisy_input_ids"], reference["noisy_input_ids"])


# --- complementary masking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PaddingCollator, PackingCollator])
def test_complementary_pairs_cover_the_response_exactly_once(cls):
    kwargs = {"max_seq_len": 64} if cls is PackingCollator else {}
    batch = collator(cls, complementary_masking=True, **kwargs)(FEATURES)
    documents = check_contract(batch, FEATURES, noise_range=(0.2 - 1e-6, 0.8))
    assert sorted(documents) == [0, 1, 2, 3]
    for f in FEATURES:
        pair = documents[f["sample_index"]]
        assert len(pair) == 2
        masked = [(x_t == MASK) for x_t, _, _ in pair]
        response = torch.arange(len(f["input_ids"])) >= f["prompt_length"]
        assert not (masked[0] & masked[1]).any()
        assert torch.equal(masked[0] | masked[1], response)
        rates = sorted(rate for _, _, rate in pair)
        assert rates[0] + rates[1] == pytest.approx(1.0, abs=1e-6)
    if cls is PaddingCollator:  # pairs are adjacent rows, the drawn instance first
        reference = check_contract(collator(cls)(FEATURES), FEATURES)
        for index, docs in documents.items():
            assert torch.equal(docs[0][0], reference[index][0][0])
            assert docs[1][2] == pytest.approx(1.0 - reference[index][0][2], abs=1e-6)


# --- given noise and fixed mask rate ----------------------------------------------------------------------------


def test_given_noise_is_used_verbatim():
    given = {"input_ids": [10, 11, 12, 13, 14, 15, 16, 17], "prompt_length": 3, "sample_index": 9,
             "noisy_input_ids": [10, 11, 12, MASK, 14, MASK, 16, 17],
             "labels": [IGNORE_INDEX] * 3 + [13, IGNORE_INDEX, 15, IGNORE_INDEX, IGNORE_INDEX]}
    for cls, kwargs in ((PaddingCollator, {}), (PackingCollator, {"max_seq_len": 32})):
        batch = collator(cls, seed=1, **kwargs)([given, FEATURES[1]])
        documents = check_contract(batch, [given, FEATURES[1]], noise_range=None)
        (x_t, labels, rate), = documents[9]
        assert x_t.tolist() == given["noisy_input_ids"] and labels.tolist() == given["labels"]
        assert rate == pytest.approx(2 / 5)  # 2 supervised of 5 response tokens
        assert 0.3 <= documents[1][0][2] <= 0.8  # the other document is still noised


def test_fixed_mask_rate():
    features = [feature(i, 4, 36) for i in range(150)]  # 150 x 32 = 4800 response tokens
    batch = collator(PaddingCollator, fixed_mask_rate=0.25, seed=3)(features)
    check_contract(batch, features, noise_range=(0.25, 0.25))
    real = batch["attention_mask"].bool()
    assert (batch["mask_rate"][real] == 0.25).all()
    fraction = float((batch["noisy_input_ids"] == MASK).sum()) / (150 * 32)
    # Binomial std is sqrt(0.25 * 0.75 / 4800) ~ 0.006; 0.03 is 5 std and the seed is fixed.
    assert abs(fraction - 0.25) < 0.03


# --- prepared arithmetic documents --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arithmetic_documents():
    train = make_arithmetic_dataset(12, 1, seed=0, task="mixed")["train"]
    documents, _ = prepare_dataset(train, load_demo_tokenizer(), block_size=8, max_seq_len=512, mask_token_id=MASK)
    return list(documents)


def test_collators_on_prepared_documents(arithmetic_documents):
    features = arithmetic_documents
    longest = max(len(f["input_ids"]) for f in features)
    padded = collator(PaddingCollator, block_size=8, seed=2)(features)
    packed = collator(PackingCollator, block_size=8, seed=2, max_seq_len=512)(features[::-1])
    one_row = collator(PositionIdCollator, block_size=8, seed=2, return_flash_attn_kwargs=True)(features)
    assert padded["input_ids"].shape == (12, longest)
    assert one_row["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    results = [check_contract(batch, features, block_size=8) for batch in (padded, packed, one_row)]
    assert Counter(len(r) for r in results) == Counter({12: 3})
    for index in range(12):
        (x_t, labels, rate), = results[0][index]
        for other in results[1:]:
            (other_x_t, other_labels, other_rate), = other[index]
            assert torch.equal(x_t, other_x_t) and torch.equal(labels, other_labels) and rate == other_rate
