"""Block-diffusion generation: the per-step rule, EOS handling, cache == recompute, batch == one at a time, CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from model_helpers import tiny_model

import dfactory_hf
from dfactory_hf import generate
from dfactory_hf.generation.decoding import pick_tokens, select_positions_to_commit, transfer_schedule

MASK, EOS = 2, 1  # the shipped tokenizer's ids
TOKENIZER_DIR = Path(dfactory_hf.__file__).parent / "assets" / "tokenizer"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models are dominated by per-op overhead; two threads fighting other test processes are ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    # initializer_range 0.1 (not 0.02): top probabilities spread over ~0.04-0.25 instead of sitting near
    # 1/vocab, so a threshold of 0.1 sends some steps down the threshold path and others to the fallback.
    return tiny_model(seed=0, initializer_range=0.1)


def ragged_prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 100, (length,), generator=generator).tolist() for length in lengths]


# ---------------------------------------------------------------------------------------------- per-step rule


def test_transfer_schedule_spreads_the_remainder_over_the_first_steps():
    assert transfer_schedule(10, 4).tolist() == [3, 3, 2, 2]
    assert transfer_schedule(3, 5).tolist() == [1, 1, 1, 0, 0]
    assert transfer_schedule(torch.tensor([32, 7, 0]), 4).tolist() == [[8, 8, 8, 8], [2, 2, 2, 1], [0, 0, 0, 0]]


def test_select_positions_threshold_path_commits_every_masked_position_above_threshold():
    confidence = torch.tensor([[0.90, 0.96, 0.97, 0.99, 0.20]])
    still_masked = torch.tensor([[True, True, True, False, True]])  # 0.99 is already committed
    commit = select_positions_to_commit(confidence, still_masked, torch.tensor([2]), threshold=0.95)
    assert commit.tolist() == [[False, True, True, False, False]]


def test_select_positions_fallback_commits_the_most_confident_when_too_few_pass():
    confidence = torch.tensor(
        [
            [0.96, 0.50, 0.80, 0.99, 0.10],  # one passes, two scheduled: 0.96 and 0.80 (0.99 is not masked)
            [0.30, 0.30, 0.20, 0.30, 0.10],  # ties go to the earlier position
            [0.10, 0.20, 0.30, 0.40, 0.50],  # more scheduled than masked: all masked ones
        ]
    )
    still_masked = torch.tensor(
        [[True, True, True, False, True], [True, True, True, True, True], [False, False, False, True, True]]
    )
    commit = select_positions_to_commit(confidence, still_masked, torch.tensor([2, 2, 5]), threshold=0.95)
    assert commit.tolist() == [
        [True, False, True, False, False],
        [True, True, False, False, False],
        [False, False, False, True, True],
    ]


def test_pick_tokens_greedy_probability_is_the_argmax_softmax_after_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    tokens, probability = pick_tokens(logits, temperature=0.0)
    assert tokens.tolist() == [0]
    assert probability.item() == pytest.approx(math.exp(2) / sum(math.exp(x) for x in (2, 1, 0, -1)))
    _, top2_probability = pick_tokens(logits, temperature=0.0, top_k=2)
    assert top2_probability.item() == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(1)))
    # top_p=0.5: the best token alone already holds more than half the mass.
    _, nucleus_probability = pick_tokens(logits, temperature=0.0, top_p=0.5)
    assert nucleus_probability.item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- scripted fake model


class ScriptedModel(torch.nn.Module):
    """Logits are a function of (absolute position, call index): `token_at(position, call)` with probability
    `confidence.get(position, default_confidence)`. Records every call's position ids."""

    def __init__(self, token_at, confidence: dict[int, float], default_confidence: float = 0.5, vocab: int = 64):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=1024)
        self.token_at, self.confidence, self.vocab = token_at, confidence, vocab
        self.default_confidence = default_confidence
        self.calls: list[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=False, logits_to_keep=0):
        batch, length = input_ids.shape
        assert attention_mask.shape == (batch, 1, length, length) and attention_mask.dtype == torch.bool
        call = len(self.calls)
        self.calls.append(position_ids.clone())
        logits = torch.empty(batch, length, self.vocab)
        for row in range(batch):
            for index, position in enumerate(position_ids[row].tolist()):
                probability = self.confidence.get(position, self.default_confidence)
                logits[row, index] = math.log((1 - probability) / (self.vocab - 1))
                logits[row, index, self.token_at(position, call)] = math.log(probability)
        if isinstance(logits_to_keep, torch.Tensor):  # transformers' convention: a bool [B, S] keeps those rows
            return SimpleNamespace(logits=logits[logits_to_keep])
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def test_end_to_end_commit_order_follows_threshold_and_schedule():
    # Token = 20 + the call that committed it, so the output shows at which step each position was committed.
    # Prompt positions 0-3; blocks [4, 8) and [8, 12); 2 steps per block (schedule 2, 2); threshold 0.9.
    confidence = {4: 0.5, 5: 0.97, 6: 0.96, 7: 0.3, 8: 0.2, 9: 0.4, 10: 0.99, 11: 0.1}
    model = ScriptedModel(lambda position, call: 20 + call, confidence)
    tokens = generate(model, [[5, 6, 7, 8]], gen_length=8, block_length=4, steps=2, threshold=0.9,
                      eos_token_id=EOS, mask_token_id=MASK, use_cache=False)
    # Block 1, call 0: 5 and 6 pass (2 >= 2 scheduled); call 1: 4 and 7 by fallback.
    # Block 2, call 2: only 10 passes (1 < 2): fallback takes 10 and 9; call 3: 8 and 11.
    assert tokens == [[21, 20, 20, 21, 23, 22, 22, 23]]
    assert len(model.calls) == 4


def eos_model(eos_position: int) -> ScriptedModel:
    # Token 7 everywhere (probability 0.5), except a confident EOS at `eos_position`.
    return ScriptedModel(lambda position, call: EOS if position == eos_position else 7, {eos_position: 0.99})


def test_eos_truncates_and_stops_after_the_block_holding_it():
    model = eos_model(eos_position=9)
    tokens = generate(model, [[5, 6, 7, 8]], gen_length=16, block_length=4, steps=4, threshold=0.9,
                      eos_token_id=EOS, mask_token_id=MASK, use_cache=False)
    assert tokens == [[7, 7, 7, 7, 7, EOS]]
    assert len(model.calls) == 8  # blocks [4, 8) and [8, 12), 4 steps each; blocks 3 and 4 never run
    assert max(int(call.max()) for call in model.calls) == 11


def test_eos_early_stop_stops_once_no_mask_precedes_the_eos():
    model = eos_model(eos_position=9)
    tokens = generate(model, [[5, 6, 7, 8]], gen_length=16, block_length=4, steps=4, threshold=0.9,
                      eos_token_id=EOS, mask_token_id=MASK, eos_early_stop=True, use_cache=False)
    assert tokens == [[7, 7, 7, 7, 7, EOS]]
    # Block 2: call 1 commits the EOS at 9 (mask left at 8), call 2 commits 8, so the row stops there.
    assert len(model.calls) == 4 + 2


def test_gen_length_caps_the_answer_and_a_block_ending_past_it_is_still_whole():
    model = ScriptedModel(lambda position, call: 7, {})
    tokens = generate(model, [[5, 6, 7]], gen_length=6, block_length=4, steps=4, threshold=0.9,
                      eos_token_id=EOS, mask_token_id=MASK, use_cache=False)
    assert tokens == [[7] * 6]
    # Answer positions 3..8 cover blocks [0, 4), [4, 8), [8, 12): one masked position in block 0 (1 step),
    # then 4 steps in each of the two other blocks.
    assert len(model.calls) == 1 + 4 + 4


# ---------------------------------------------------------------------------------------- tiny real model


class CommitPaths:
    """on_step observer counting (row, step) decisions taken by the threshold rule and by the fallback."""

    def __init__(self, threshold: float):
        self.threshold, self.by_threshold, self.by_fallback = threshold, 0, 0

    def __call__(self, step) -> None:
        active = step.still_masked.any(dim=-1)
        passing = step.still_masked & (step.confidence > self.threshold)
        by_threshold = active & passing.any(dim=-1) & (step.committed == passing).all(dim=-1)
        self.by_threshold += int(by_threshold.sum())
        self.by_fallback += int((active & ~by_threshold).sum())


@pytest.mark.parametrize("lengths", [(5,), (5, 19, 11)])  # no prefill (empty cache); a 2-block prefill with padding
def test_cached_decoding_matches_recomputing(model, lengths):
    paths = CommitPaths(threshold=0.1)
    prompts = ragged_prompts(lengths)
    settings = dict(gen_length=20, block_length=8, steps=4, threshold=0.1, eos_token_id=None, mask_token_id=MASK)
    cached = generate(model, prompts, use_cache=True, on_step=paths, **settings)
    recomputed = generate(model, prompts, use_cache=False, **settings)
    assert cached == recomputed
    assert all(len(row) == 20 for row in cached)
    assert all(len(set(row)) > 2 for row in cached), "a random model should not emit one token over and over"
    assert paths.by_threshold > 0 and paths.by_fallback > 0


def test_batch_equals_one_at_a_time(model):
    prompts = ragged_prompts((3, 17, 9))
    settings = dict(gen_length=18, block_length=8, steps=4, threshold=0.1, eos_token_id=None, mask_token_id=MASK)
    batched = generate(model, prompts, **settings)
    assert batched == [generate(model, [prompt], **settings)[0] for prompt in prompts]
    assert batched[0] != batched[1]


def test_cache_processes_fewer_tokens(model):
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].numel()),
                                             with_kwargs=True)
    try:
        prompts, settings = ragged_prompts((20,)), dict(gen_length=16, block_length=8, steps=4, threshold=0.1,
                                                        eos_token_id=None, mask_token_id=MASK)
        cached = generate(model, prompts, use_cache=True, **settings)
        cached_calls = list(seen)
        seen.clear()
        recomputed = generate(model, prompts, use_cache=False, **settings)
    finally:
        handle.remove()
    assert cached == recomputed
    # Cached: one prefill of the two full prompt blocks, then block-sized calls only.
    assert cached_calls[0] == 16 and set(cached_calls[1:]) == {8}
    assert sum(cached_calls) < sum(seen) / 2


def test_on_block_committed_streams_the_answer(model):
    prompts = ragged_prompts((6, 12))
    streamed: list[list[int]] = [[], []]
    block_indices: list[int] = []

    def on_block(new_tokens, block_index):
        block_indices.append(block_index)
        for row, tokens in enumerate(new_tokens):
            streamed[row].extend(tokens)

    tokens = generate(model, prompts, gen_length=20, block_length=8, steps=4, threshold=0.1, eos_token_id=None,
                      mask_token_id=MASK, on_block_committed=on_block)
    assert streamed == tokens
    assert block_indices == [0, 1, 2, 3]  # rows start in block 1 and end in blocks 3 and 4


def test_sampling_is_reproducible_with_a_generator(model):
    def sample(seed: int) -> list[list[int]]:
        return generate(model, ragged_prompts((7, 10)), gen_length=16, block_length=8, steps=4, threshold=0.9,
                        temperature=0.8, top_k=40, top_p=0.95, eos_token_id=None, mask_token_id=MASK,
                        generator=torch.Generator().manual_seed(seed))

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_eager_attention_matches_sdpa_and_training_mode_is_restored():
    model = tiny_model(seed=1, initializer_range=0.1)
    settings = dict(gen_length=12, block_length=8, steps=4, threshold=0.1, eos_token_id=None, mask_token_id=MASK)
    prompts = ragged_prompts((4, 10))
    with_sdpa = generate(model, prompts, **settings)
    model.set_attn_implementation("eager")
    model.train()
    assert generate(model, prompts, **settings) == with_sdpa
    assert model.training


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"gen_length": 0}, r"gen_length \(0\) must be > 0"),
        ({"steps": 0}, r"steps \(0\) must be > 0"),
        ({"block_length": -1}, r"block_length \(-1\) must be > 0"),
        ({"threshold": 0.0}, r"threshold \(0.0\) must be in \(0, 1\]"),
        ({"threshold": 1.5}, r"threshold \(1.5\) must be in \(0, 1\]"),
        ({"temperature": -0.1}, r"temperature \(-0.1\) must be >= 0; use 0 for greedy"),
        ({"top_p": 0.0}, r"top_p \(0.0\) must be in \(0, 1\]"),
        ({"top_k": 0}, r"top_k \(0\) must be a positive integer"),
        ({"mask_token_id": None}, r"mask_token_id is None; pass the tokenizer's mask token id"),
        ({"prompt_ids": [[4, 5], []]}, r"prompt_ids row 1 is empty"),
        ({"prompt_ids": [4, 5, 6]}, r"prompt_ids must be a list of token-id lists .* wrap a single prompt"),
        ({"prompt_ids": [[4], [5] * 100], "gen_length": 4000},
         r"prompt_ids row 1: prompt \(100 tokens\) \+ gen_length \(4000\) = 4100 exceeds "
         r"model.config.max_position_embeddings \(4096\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(model, overrides, message):
    arguments = dict(prompt_ids=[[4, 5]], gen_length=8, eos_token_id=EOS, mask_token_id=MASK) | overrides
    with pytest.raises(ValueError, match=message):
        generate(model, **arguments)


# ------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, model):
    assert TOKENIZER_DIR.is_dir(), f"the shipped tokenizer ({TOKENIZER_DIR}) is missing: a packaging bug"
    directory = tmp_path_factory.mktemp("tiny_llada2")
    model.save_pretrained(directory)
    return directory


def test_cli_generate_streams_blocks_and_prints_the_answer(saved_model):
    result = subprocess.run(
        [sys.executable, "-m", "dfactory_hf.cli", "generate", "--model", str(saved_model), "--tokenizer",
         str(TOKENIZER_DIR), "--prompt", "What is 2 + 3?", "--prompt", "Hi", "--gen_length", "16",
         "--block_length", "8", "--steps", "4", "--threshold", "0.1"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "[0] block 0:" in result.stdout and "[1] block 0:" in result.stdout
    assert "=== answer 0 (" in result.stdout and "=== answer 1 (" in result.stdout


def test_cli_refuses_a_tokenizer_without_mask_token(saved_model, tmp_path, capsys):
    tokenizer_dir = tmp_path / "tokenizer"
    shutil.copytree(TOKENIZER_DIR, tokenizer_dir)
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("mask_token")
    config_path.write_text(json.dumps(config))
    from dfactory_hf.cli import main

    assert main(["generate", "--model", str(saved_model), "--tokenizer", str(tokenizer_dir), "--prompt", "x"]) == 2
    assert "has no mask token" in capsys.readouterr().err
