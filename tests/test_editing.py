"""Draft-and-edit (LLaDA2.1): the edit noise, the three-stream loss and the two-threshold sampler, each against a
literal restatement; turning the features off changes nothing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from model_helpers import literal_block_diffusion_mask, tiny_model
from test_generation import EOS, MASK, ScriptedModel, one_thread, ragged_prompts  # noqa: F401 (fixture)
from trainer_helpers import TOKENIZER, demo_args, demo_trainer

from dfactory_hf import generate
from dfactory_hf.data.collators import EDITED, KEPT, MASKED, PackingCollator, PaddingCollator, edit_token_ids
from dfactory_hf.diffusion.noise import document_generator, edit_document, mask_document
from dfactory_hf.generation.decoding import select_positions_to_edit

CANDIDATES = torch.arange(10, 20)


# ------------------------------------------------------------------------------------------------------- noise


def _masked_document(seed: int, length: int = 400, prompt_length: int = 40, t: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    x_0 = torch.randint(10, 20, (length,), generator=generator)
    x_t, is_masked = mask_document(x_0, prompt_length, t, MASK, generator)
    return x_0, x_t, is_masked, prompt_length


def test_edit_noise_replaces_only_visible_response_tokens_by_other_candidates():
    x_0, x_t, is_masked, prompt_length = _masked_document(0)
    edited, is_edited = edit_document(x_t, prompt_length, is_masked, 0.25, CANDIDATES, torch.Generator().manual_seed(1))
    # Literal: an edited position is a visible response token now holding a different candidate; the rest as given.
    for position in range(len(x_0)):
        if is_edited[position]:
            assert position >= prompt_length and not is_masked[position]
            assert edited[position] != x_t[position] and int(edited[position]) in CANDIDATES.tolist()
        else:
            assert edited[position] == x_t[position]
    visible = int((~is_masked[prompt_length:]).sum())
    rate = int(is_edited.sum()) / visible
    assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / visible), rate  # four standard errors
    again, _ = edit_document(x_t, prompt_length, is_masked, 0.25, CANDIDATES, torch.Generator().manual_seed(1))
    assert torch.equal(again, edited)


def test_edit_replacement_is_uniform_over_the_other_candidates():
    # Own token 12 is a candidate: the other 9 equally often; own token 99 is not: all 10 equally often.
    for own, expected in ((12, [c for c in range(10, 20) if c != 12]), (99, list(range(10, 20)))):
        x_t = torch.full((20001,), own)
        _, is_masked = x_t.clone(), torch.zeros(20001, dtype=torch.bool)
        edited, is_edited = edit_document(x_t, 1, is_masked, 0.999, CANDIDATES, torch.Generator().manual_seed(0))
        counts = torch.bincount(edited[is_edited], minlength=100)
        assert sorted(counts.nonzero().flatten().tolist()) == expected
        share = counts[expected].float() / counts.sum()
        assert (share - 1 / len(expected)).abs().max() < 0.01, share


def test_edit_rate_zero_draws_nothing():
    _, x_t, is_masked, prompt_length = _masked_document(0)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    edited, is_edited = edit_document(x_t, prompt_length, is_masked, 0.0, CANDIDATES, generator)
    assert torch.equal(edited, x_t) and not is_edited.any() and torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("rate", [-0.1, 1.0, float("nan")])
def test_edit_noise_rate_outside_its_range_is_refused(tmp_path, rate):
    with pytest.raises(ValueError, match=r"edit_noise_rate \(.*\) must be in \[0, 1\)"):
        demo_args(tmp_path, edit_noise_rate=rate)


def test_negative_keep_weight_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"edit_keep_weight \(-1.0\) must be >= 0"):
        demo_args(tmp_path, edit_keep_weight=-1.0)


def _features(num: int = 6):
    generator = torch.Generator().manual_seed(3)
    features = []
    for index in range(num):
        length = 8 * int(torch.randint(2, 5, (1,), generator=generator))
        features.append({"input_ids": torch.randint(10, 40, (length,), generator=generator).tolist(),
                         "prompt_length": 5, "sample_index": index})
    return features


def _collator(cls=PaddingCollator, **kw):
    return cls(mask_token_id=MASK, pad_token_id=0, block_size=8, edit_token_ids=tuple(range(10, 40)), **kw)


def test_collator_off_is_unchanged_and_on_records_every_stream():
    features = _features()
    plain = PaddingCollator(mask_token_id=MASK, pad_token_id=0, block_size=8)(features)
    off = _collator(edit_noise_rate=0.0)(features)
    assert plain.keys() == off.keys() and all(torch.equal(plain[k], off[k]) for k in plain)

    on = _collator(edit_noise_rate=0.3, supervise_kept=True)(features)
    masked = plain["noisy_input_ids"] == MASK
    assert torch.equal(on["noisy_input_ids"] == MASK, masked), "edits must not change the masks"
    kind = on["noise_kind"]
    assert torch.equal(kind == MASKED, masked)
    edited, kept = kind == EDITED, kind == KEPT
    assert edited.any() and kept.any()
    assert (on["noisy_input_ids"][edited] != on["input_ids"][edited]).all()
    assert torch.equal(on["noisy_input_ids"][kept], on["input_ids"][kept])
    supervised = kind > 0
    assert torch.equal(on["labels"][supervised], on["input_ids"][supervised])
    assert (on["labels"][~supervised] == -100).all()
    # Every response token is in exactly one stream; prompt and padding in none.
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        assert (kind[row, :5] == 0).all() and (kind[row, 5:n] > 0).all() and (kind[row, n:] == 0).all()


def test_complementary_pairs_keep_their_masks_and_draw_their_own_edits():
    features = _features()
    on = _collator(edit_noise_rate=0.3, complementary_masking=True)(features)
    off = _collator(complementary_masking=True)(features)
    assert torch.equal(on["noisy_input_ids"] == MASK, off["noisy_input_ids"] == MASK)
    # One document per row, each followed by its complement: the masks cover every response token exactly once,
    # and each instance edits only tokens it leaves visible.
    kind = on["noise_kind"]
    segments = [(kind[2 * i, :len(f["input_ids"])], kind[2 * i + 1, :len(f["input_ids"])])
                for i, f in enumerate(features)]
    num_edited = 0
    for first, second in segments:
        assert ((first[5:] == MASKED) ^ (second[5:] == MASKED)).all()  # each token masked in exactly one
        assert ((first[5:] == EDITED) <= (second[5:] == MASKED)).all()  # an edit sits where the other masks
        assert ((second[5:] == EDITED) <= (first[5:] == MASKED)).all()
        num_edited += int((first == EDITED).sum() + (second == EDITED).sum())
    assert num_edited > 0


def test_edit_vocabulary_excludes_special_tokens():
    ids = edit_token_ids(TOKENIZER, vocab_size=10_000)
    special = set(TOKENIZER.all_special_ids)
    assert ids and not special & set(ids) and max(ids) < len(TOKENIZER)
    assert len(ids) == len(TOKENIZER) - len(special)
    assert max(edit_token_ids(TOKENIZER, vocab_size=50)) < 50


# -------------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("loss_weighting", ["mean", "elbo"])
def test_three_stream_loss_equals_literal_restatement(tmp_path, loss_weighting):
    trainer = demo_trainer(tmp_path, edit_noise_rate=0.2, edit_keep_weight=0.5, loss_weighting=loss_weighting)
    model = trainer.model.eval()
    rows = [row for row in trainer.train_dataset if row["num_tokens"] == 52][:3]
    batch = trainer.data_collator(rows)
    kind = batch["noise_kind"]
    assert {MASKED, EDITED, KEPT} <= set(kind.unique().tolist())
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        loss, step = trainer.compute_loss(model, batch, return_outputs=True)
        mask = literal_block_diffusion_mask(length, 4)[None, None].expand(3, 1, -1, -1)
        logits = model(input_ids=torch.cat([batch["noisy_input_ids"], batch["input_ids"]], 1),
                       position_ids=torch.arange(length).repeat(3, 2), attention_mask=mask).logits[:, :length]
    total, count = 0.0, 0
    per_stream = {MASKED: [], EDITED: [], KEPT: []}
    for row in range(3):
        for p in range(length):
            if kind[row, p] == 0:
                continue
            ce = -F.log_softmax(logits[row, p], dim=-1)[batch["input_ids"][row, p]]
            t = float(batch["mask_rate"][row, p])
            weight = (1 / t if loss_weighting == "elbo" else 1.0) * (0.5 if kind[row, p] == KEPT else 1.0)
            total, count = total + weight * ce, count + 1
            per_stream[int(kind[row, p])].append(float(ce))
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=1e-5)
    for stream, values in per_stream.items():
        assert int(step.loss.group_tokens[stream]) == len(values)
        torch.testing.assert_close(float(step.loss.group_ce_sum[stream]), sum(values), atol=1e-4, rtol=1e-5)


def test_training_with_edits_logs_the_streams(tmp_path):
    trainer = demo_trainer(tmp_path, edit_noise_rate=0.2, edit_keep_weight=0.1, max_steps=2, logging_steps=1)
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("m2t_loss", "t2t_loss", "keep_loss", "edit_accuracy", "keep_accuracy"):
        assert key in logged and math.isfinite(logged[key]), key
    plain = demo_trainer(tmp_path / "plain", max_steps=1, logging_steps=1)
    plain.train()
    assert "t2t_loss" not in plain.state.log_history[0]


# ------------------------------------------------------------------------------------------------------ sampler


def test_select_positions_to_edit_matches_the_literal_rule():
    generator = torch.Generator().manual_seed(0)
    confidence = torch.rand(5, 16, generator=generator)
    tokens, current = torch.randint(0, 4, (5, 16), generator=generator), torch.randint(0, 4, (5, 16), generator=generator)
    editable = torch.rand(5, 16, generator=generator) < 0.6
    edit = select_positions_to_edit(confidence, tokens, current, editable, 0.5)
    for b in range(5):
        for i in range(16):
            expected = bool(editable[b, i]) and int(tokens[b, i]) != int(current[b, i]) and float(confidence[b, i]) > 0.5
            assert bool(edit[b, i]) == expected


class Script(torch.nn.Module):
    """A stand-in model whose top token and its probability at each absolute position are `script(position,
    call)`; every other token shares the rest of the mass. One call per pass without a cache."""

    def __init__(self, script, vocab: int = 64):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.config = ScriptedModel(lambda p, c: 0, {}).config

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=False, logits_to_keep=0):
        batch, length = input_ids.shape
        logits = torch.empty(batch, length, self.vocab)
        for row in range(batch):
            for index, position in enumerate(position_ids[row].tolist()):
                token, probability = self.script(position, self.calls)
                logits[row, index] = math.log((1 - probability) / (self.vocab - 1))
                logits[row, index, token] = math.log(probability)
        self.calls += 1
        return SimpleNamespace(logits=logits[logits_to_keep] if isinstance(logits_to_keep, torch.Tensor)
                               else logits[:, -logits_to_keep:])


def literal_draft_and_edit(script, *, prompt: list[int], gen_length: int, block: int, steps: int, threshold: float,
                           edit_threshold: float, edit_steps: int) -> tuple[list[int], int]:
    """REFERENCE 8's rule written out for one row without a cache (one model call per pass): per pass, M2T =
    masked positions above `threshold` (else the scheduled most confident), T2T = positions of the block filled in
    earlier passes whose top token differs with probability above `edit_threshold`; once nothing is masked, at
    most `edit_steps` more passes, ending at one that edits nothing. Returns (answer, calls)."""
    canvas = list(prompt) + [MASK] * gen_length
    calls = 0
    for start in range(len(prompt) // block * block, len(canvas), block):
        masked = [p for p in range(max(start, len(prompt)), start + block)]
        filled: list[int] = []
        schedule = [len(masked) // steps + (1 if s < len(masked) % steps else 0) for s in range(steps)]
        step, edit_only = -1, 0
        while True:
            step += 1
            if not masked:
                if edit_only == edit_steps:
                    break
                edit_only += 1
            top = {p: script(p, calls) for p in masked + filled}
            calls += 1
            above = [p for p in masked if top[p][1] > threshold]
            need = schedule[step] if step < steps else 0
            commit = above if len(above) >= need else sorted(masked, key=lambda p: -top[p][1])[:need]
            edit = [p for p in filled if top[p][0] != canvas[p] and top[p][1] > edit_threshold]
            unmasking = bool(masked)
            for p in commit + edit:
                canvas[p] = top[p][0]
            masked = [p for p in masked if p not in commit]
            filled += commit
            if not unmasking and not edit:
                break
    return canvas[len(prompt):], calls


def drafts_then_corrections(position: int, call: int) -> tuple[int, float]:
    """Drafts 20 + call with fixed confidences; from call 2 on, positions 5 and 9 read 30 with 0.95 (above an
    edit threshold of 0.9) and position 6 reads 31 with 0.8 (below it)."""
    if call >= 2 and position in (5, 9):
        return 30, 0.95
    if call >= 2 and position == 6:
        return 31, 0.8
    return 20 + call, {4: 0.5, 5: 0.97, 6: 0.96, 7: 0.3, 8: 0.2, 9: 0.99, 10: 0.95, 11: 0.1}.get(position, 0.5)


@pytest.mark.parametrize("edit_steps", [0, 1, 3])
def test_two_threshold_decoding_equals_the_literal_rule(edit_steps):
    settings = dict(gen_length=8, steps=2, threshold=0.9, edit_threshold=0.9, edit_steps=edit_steps)
    model, edits = Script(drafts_then_corrections), []
    tokens = generate(model, [[5, 6, 7, 8]], block_length=4, eos_token_id=EOS, mask_token_id=MASK, use_cache=False,
                      on_step=lambda step: edits.append(int(step.edited.sum())), **settings)
    expected, calls = literal_draft_and_edit(drafts_then_corrections, prompt=[5, 6, 7, 8], block=4, **settings)
    assert tokens == [expected] and model.calls == calls
    assert 30 in expected and sum(edits) > 0, "the scenario must edit"


def test_the_edit_budget_bounds_a_model_that_keeps_changing_its_mind():
    # Every call proposes a new token with probability 0.99 everywhere: edits never settle.
    model = Script(lambda position, call: (20 + call % 5, 0.99))
    passes = []
    generate(model, [[5, 6, 7, 8]], gen_length=8, block_length=4, steps=4, threshold=0.9, eos_token_id=EOS,
             mask_token_id=MASK, use_cache=False, edit_threshold=0.5, edit_steps=3,
             on_step=lambda step: passes.append(step.block_index))
    # All four masks pass the threshold at the first pass; then the 3 editing passes: 1 + 3 per block.
    assert passes == [0] * 4 + [1] * 4


def test_editing_that_never_triggers_gives_todays_tokens(model):
    prompts = ragged_prompts((5, 11))
    settings = dict(gen_length=16, block_length=8, steps=4, threshold=0.1, eos_token_id=None, mask_token_id=MASK)
    today = generate(model, prompts, **settings)
    assert generate(model, prompts, edit_threshold=None, **settings) == today
    assert generate(model, prompts, edit_threshold=1.0, **settings) == today  # no probability exceeds 1


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, initializer_range=0.1)


def test_cached_editing_matches_recomputing_and_saves_the_append_pass(model):
    prompts = ragged_prompts((5, 11))
    settings = dict(gen_length=16, block_length=8, steps=4, threshold=0.05, eos_token_id=None, mask_token_id=MASK,
                    edit_threshold=0.1, edit_steps=4)
    steps, calls = [], []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        cached = generate(model, prompts, use_cache=True, on_step=steps.append, **settings)
        cached_calls = list(calls)
        recomputed = generate(model, prompts, use_cache=False, **settings)
    finally:
        handle.remove()
    assert cached == recomputed
    assert sum(int(step.edited.sum()) for step in steps) > 0, "a random model at these thresholds should edit"
    # One prefill (the prompts end in block 0, generation starts in block 1), one call per pass, and an append
    # call only after a block (not the last) whose final pass changed something.
    last_pass = {step.block_index: step for step in steps}
    blocks = sorted(last_pass)
    appends = sum(bool(last_pass[b].still_masked.any() or last_pass[b].edited.any()) for b in blocks[:-1])
    assert len(cached_calls) == 1 + len(steps) + appends
    assert appends < len(blocks) - 1, "no block ended on a no-change pass: the saving was not exercised"


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(edit_threshold=0.0), r"edit_threshold \(0.0\) must be in \(0, 1\]"),
    (dict(edit_threshold=1.5), r"edit_threshold \(1.5\) must be in \(0, 1\]"),
    (dict(edit_threshold=0.9, edit_steps=-1), r"edit_steps \(-1\) must be an integer >= 0"),
])
def test_bad_editing_arguments_name_the_argument(model, overrides, message):
    with pytest.raises(ValueError, match=message):
        generate(model, [[5, 6]], gen_length=4, block_length=4, eos_token_id=EOS, mask_token_id=MASK, **overrides)


def test_cli_generate_takes_the_edit_flags(tmp_path, model, capsys):
    from test_generation import TOKENIZER_DIR

    from dfactory_hf.cli import main

    model.save_pretrained(tmp_path / "model")
    command = ["generate", "--model", str(tmp_path / "model"), "--tokenizer", str(TOKENIZER_DIR), "--prompt",
               "What is 2 + 3?", "--gen_length", "8", "--block_length", "8", "--steps", "4", "--threshold", "0.1"]
    assert main(command + ["--edit_threshold", "0.2", "--edit_steps", "2"]) == 0
    assert "=== answer 0 (" in capsys.readouterr().out
    assert main(command + ["--edit_threshold", "0"]) == 2
    assert "edit_threshold (0.0) must be in (0, 1]" in capsys.readouterr().err
