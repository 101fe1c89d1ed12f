"""Forward process: prompt never masked, mask rate ~ t, complementary pairs, seeded per document."""

import itertools
import re

import pytest
import torch

from dfactory_hf.diffusion.noise import (
    complement_mask_rate,
    complementary_pair,
    document_generator,
    mask_document,
    sample_mask_rate,
    validate_noise_range,
)

MASK_ID = 99


def _document(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK_ID, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prompt_length", [0, 1, 7, 31])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_prompt_never_masked_and_x_t_consistent(prompt_length, t):
    x_0 = _document(32)
    for seed in range(20):
        x_t, is_masked = mask_document(x_0, prompt_length, t, MASK_ID, torch.Generator().manual_seed(seed))
        assert is_masked.dtype == torch.bool and is_masked.shape == x_0.shape
        assert not is_masked[:prompt_length].any()
        assert torch.equal(x_t[:prompt_length], x_0[:prompt_length])
        assert (x_t[is_masked] == MASK_ID).all()
        assert torch.equal(x_t[~is_masked], x_0[~is_masked])
        assert is_masked.sum() >= 1  # min_masked=1 by default
    if t == 1.0:
        assert is_masked[prompt_length:].all()


def test_mask_rate_close_to_t():
    # 200k Bernoulli(0.3) draws: std of the fraction ~0.001, the tolerance is 10 std (and the seed is fixed).
    x_0 = _document(200_001)
    _, is_masked = mask_document(x_0, 1, 0.3, MASK_ID, torch.Generator().manual_seed(0))
    assert abs(is_masked[1:].float().mean().item() - 0.3) < 0.01


def test_min_masked_forces_only_when_needed():
    x_0 = _document(20)
    for min_masked, expected in [(0, 0), (1, 1), (3, 3), (50, 15)]:
        _, is_masked = mask_document(x_0, 5, 0.0, MASK_ID, torch.Generator().manual_seed(0), min_masked=min_masked)
        assert int(is_masked.sum()) == expected
        assert not is_masked[:5].any()
    # Forcing adds to the Bernoulli draw, never replaces it: same stream, drawn set is a subset.
    for seed in range(50):
        _, drawn = mask_document(x_0, 5, 0.1, MASK_ID, torch.Generator().manual_seed(seed), min_masked=0)
        _, forced = mask_document(x_0, 5, 0.1, MASK_ID, torch.Generator().manual_seed(seed), min_masked=4)
        assert (forced | drawn).equal(forced)
        assert int(forced.sum()) == max(int(drawn.sum()), 4)


@pytest.mark.parametrize("t", [0.05, 0.5, 0.95, 1.0])
def test_complementary_pair_covers_each_response_token_once(t):
    x_0 = _document(40)
    prompt_length = 9
    x_t, is_masked = mask_document(x_0, prompt_length, t, MASK_ID, torch.Generator().manual_seed(3))
    x_t_c, is_masked_c = complementary_pair(x_0, prompt_length, is_masked, MASK_ID)
    is_response = torch.arange(40) >= prompt_length
    assert torch.equal(is_masked.int() + is_masked_c.int(), is_response.int())
    assert not is_masked_c[:prompt_length].any()
    assert (x_t_c[is_masked_c] == MASK_ID).all()
    assert torch.equal(x_t_c[~is_masked_c], x_0[~is_masked_c])
    if t == 1.0:
        assert not is_masked_c.any()  # empty complement: documented, the loss handles N == 0
    assert complement_mask_rate(t) == pytest.approx(1.0 - t)


def test_sample_mask_rate_range_and_dtype():
    t = sample_mask_rate(10_000, 0.3, 0.8, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (10_000,)
    assert t.min() >= 0.3 and t.max() <= 0.8
    assert abs(t.mean().item() - 0.55) < 0.01  # std of the mean ~0.0014
    assert torch.equal(sample_mask_rate(3, 0.5, 0.5), torch.full((3,), 0.5))
    assert sample_mask_rate(0, 0.3, 0.8).shape == (0,)


def test_document_generator_is_deterministic():
    a = torch.rand(8, generator=document_generator(1234, 56, 7))
    b = torch.rand(8, generator=document_generator(1234, 56, 7))
    assert torch.equal(a, b)
    x_0 = _document(64)
    first = mask_document(x_0, 10, 0.5, MASK_ID, document_generator(0, 3, 1))
    second = mask_document(x_0, 10, 0.5, MASK_ID, document_generator(0, 3, 1))
    assert torch.equal(first[1], second[1])


def test_document_generator_neighbouring_triples_differ():
    triples = list(itertools.product(range(3), range(3), range(3)))
    streams = {triple: tuple(torch.rand(4, generator=document_generator(*triple)).tolist()) for triple in triples}
    assert len(set(streams.values())) == len(triples)
    # The classic collisions of additive mixing.
    assert streams[(0, 1, 0)] != streams[(0, 0, 1)] != streams[(1, 0, 0)]


def test_validation_messages():
    with pytest.raises(ValueError, match=re.escape("noise_range_low (0.9) must be <= noise_range_high (0.5)")):
        validate_noise_range(0.9, 0.5)
    with pytest.raises(ValueError, match=re.escape("noise_range_low (0.0) must be in (0, 1]")):
        validate_noise_range(0.0, 0.5)
    with pytest.raises(ValueError, match=re.escape("noise_range_high (1.5) must be in (0, 1]")):
        validate_noise_range(0.3, 1.5)
    with pytest.raises(ValueError, match=re.escape("noise_range_high (nan) must be a finite number")):
        validate_noise_range(0.3, float("nan"))
    with pytest.raises(ValueError, match=re.escape("noise_range_low (0.9) must be <= noise_range_high (0.5)")):
        sample_mask_rate(4, 0.9, 0.5)
    validate_noise_range(0.3, 0.8)
    validate_noise_range(1.0, 1.0)

    x_0 = _document(8)
    with pytest.raises(ValueError, match=re.escape("prompt_length (8) must satisfy 0 <= prompt_length < len(x_0) (8)")):
        mask_document(x_0, 8, 0.5, MASK_ID)
    with pytest.raises(ValueError, match=re.escape("t (1.5) must be in [0, 1]")):
        mask_document(x_0, 2, 1.5, MASK_ID)
    with pytest.raises(ValueError, match=re.escape("min_masked (-1) must be >= 0")):
        mask_document(x_0, 2, 0.5, MASK_ID, min_masked=-1)
    with pytest.raises(ValueError, match=re.escape("x_0 ((2, 4)) must be a 1-D LongTensor")):
        mask_document(x_0.view(2, 4), 2, 0.5, MASK_ID)

    prompt_masked = torch.zeros(8, dtype=torch.bool)
    prompt_masked[1] = True
    with pytest.raises(ValueError, match=re.escape("is_masked masks a prompt position (< prompt_length=2)")):
        complementary_pair(x_0, 2, prompt_masked, MASK_ID)
    with pytest.raises(ValueError, match=re.escape("is_masked ((8,), torch.int64) must be a bool tensor")):
        complementary_pair(x_0, 2, prompt_masked.long(), MASK_ID)

    with pytest.raises(ValueError, match=re.escape("sample_index (-1) and epoch (0) must be >= 0")):
        document_generator(0, -1, 0)
    with pytest.raises(ValueError, match=re.escape("seed (1.5) must be an integer")):
        document_generator(1.5, 0, 0)
