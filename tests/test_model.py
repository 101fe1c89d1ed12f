"""LLaDA2-MoE model: attention backends, mask handling, experts, router, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import literal_block_diffusion_mask, tiny_model
from torch.nn.attention.flex_attention import create_block_mask

from dfactory_hf.models.llada2_moe.moe import LLaDA2MoeGate

BACKENDS = ("eager", "sdpa", "flex_attention")


def _backend_mask(dense: torch.Tensor, backend: str):
    """dense bool [B, Q, K] (True = attend) -> the form each backend takes."""
    if backend == "sdpa":
        return dense[:, None]
    if backend == "eager":
        return torch.zeros(dense.shape, dtype=torch.float32).masked_fill(~dense, torch.finfo(torch.float32).min)[:, None]
    batch, q_len, kv_len = dense.shape

    def mask_mod(b, h, q, kv):
        return dense[b, q, kv]

    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device="cpu")


def _logits(model, backend, **inputs):
    model.set_attn_implementation(backend)
    with torch.no_grad():
        return model(**inputs).logits


def test_backends_agree_under_block_diffusion_mask():
    model = tiny_model()
    length, block = 24, 8
    x_0 = torch.randint(0, 128, (2, length))
    x_t = x_0.masked_fill(torch.rand(2, length) < 0.5, 3)
    dense = literal_block_diffusion_mask(length, block).expand(2, -1, -1)
    positions = torch.arange(length).repeat(2, 2)
    inputs = dict(input_ids=torch.cat([x_t, x_0], dim=1), position_ids=positions)
    outputs = {b: _logits(model, b, attention_mask=_backend_mask(dense, b), **inputs) for b in BACKENDS}
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["flex_attention"], outputs["sdpa"], atol=1e-5, rtol=0)
    # The mask is really used: full attention gives other logits.
    unmasked = _logits(model, "sdpa", **inputs)
    assert (unmasked - outputs["sdpa"]).abs().max() > 1e-3


def test_backends_agree_under_padding_mask_and_padding_is_invisible():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 16))
    padding = torch.ones(2, 16, dtype=torch.long)
    padding[1, 11:] = 0
    outputs = {b: _logits(model, b, input_ids=ids, attention_mask=padding) for b in BACKENDS}
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["flex_attention"], outputs["sdpa"], atol=1e-5, rtol=0)
    # Changing a padded token changes no logit of a real position, for every backend.
    changed = ids.clone()
    changed[1, 11:] = (changed[1, 11:] + 7) % 128
    for backend in BACKENDS:
        again = _logits(model, backend, input_ids=changed, attention_mask=padding)
        torch.testing.assert_close(again[1, :11], outputs[backend][1, :11], atol=1e-5, rtol=0)
        assert (again[1, 11:] - outputs[backend][1, 11:]).abs().max() > 1e-4


def test_no_mask_is_bidirectional_not_causal():
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 12))
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))[None, None]
    for backend in ("eager", "sdpa"):
        bidirectional = _logits(model, backend, input_ids=ids)
        causal_logits = _logits(model, backend, input_ids=ids, attention_mask=causal)
        assert (bidirectional[0, :-1] - causal_logits[0, :-1]).abs().max() > 1e-3
        # The first token sees the future without a mask: changing the last token moves its logits.
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % 128
        assert (_logits(model, backend, input_ids=changed)[0, 0] - bidirectional[0, 0]).abs().max() > 1e-6


def test_mask_longer_than_local_sequence_is_not_resliced():
    """Sequence parallel hands a slice of queries with a full-length mask; the model must pass it through."""
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 128, (1, 8))
    wrong = torch.ones(1, 1, 8, 16, dtype=torch.bool)  # keys of length 16 cannot match local keys of length 8
    with pytest.raises(RuntimeError):
        model(input_ids=ids, attention_mask=wrong)


def _per_token_expert_reference(experts, hidden, index, weights):
    out = torch.zeros_like(hidden)
    inter = experts.intermediate_dim
    for token in range(hidden.shape[0]):
        for slot in range(index.shape[1]):
            e = index[token, slot].item()
            gate_w, up_w = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
            h = F.silu(hidden[token] @ gate_w.T) * (hidden[token] @ up_w.T)
            out[token] += weights[token, slot] * (h @ experts.down_proj[e].T)
    return out


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_experts_implementations_match_per_token_loop(implementation):
    model = tiny_model()
    model.set_experts_implementation(implementation)
    block = model.model.layers[1].mlp
    hidden = torch.randn(10, model.config.hidden_size)
    _, weights, index = block.gate(hidden)
    with torch.no_grad():
        got = block.experts(hidden, index, weights)
        expected = _per_token_expert_reference(block.experts, hidden, index, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_experts_implementations_agree_on_the_whole_model():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 16))
    results = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            results[implementation] = model(input_ids=ids).logits
    torch.testing.assert_close(results["grouped_mm"], results["eager"], atol=1e-5, rtol=0)
    torch.testing.assert_close(results["batched_mm"], results["eager"], atol=1e-5, rtol=0)


def _literal_route(gate: LLaDA2MoeGate, hidden: torch.Tensor):
    """REFERENCE 4 rule, one token at a time with Python sorting."""
    picks, weights = [], []
    per_group = gate.num_experts // gate.n_group
    for token in hidden:
        scores = torch.sigmoid(token.double() @ gate.weight.double().T)
        biased = scores + gate.expert_bias.double()
        group_score = [sorted(biased[g * per_group:(g + 1) * per_group].tolist())[-2:] for g in range(gate.n_group)]
        group_score = [sum(s) for s in group_score]
        kept = sorted(range(gate.n_group), key=lambda g: -group_score[g])[: gate.topk_group]
        candidates = [e for e in range(gate.num_experts) if e // per_group in kept]
        chosen = sorted(candidates, key=lambda e: -biased[e].item())[: gate.top_k]
        w = torch.stack([scores[e] for e in chosen])
        w = w / w.sum() * gate.routed_scaling_factor
        picks.append(sorted(chosen))
        weights.append(dict(zip(chosen, w.tolist())))
    return picks, weights


def test_router_matches_literal_rule_with_groups():
    model = tiny_model(num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    gate = model.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.expert_bias.copy_(torch.randn(16) * 0.3)  # large enough to change selections
    hidden = torch.randn(64, model.config.hidden_size)
    _, weights, index = gate(hidden)
    picks, literal_weights = _literal_route(gate, hidden)
    for token in range(hidden.shape[0]):
        assert sorted(index[token].tolist()) == picks[token]
        for slot, expert in enumerate(index[token].tolist()):
            assert abs(weights[token, slot].item() - literal_weights[token][expert]) < 1e-5
    # The bias steers selection only: weights are unbiased sigmoid scores, renormalised and scaled.
    assert torch.allclose(weights.sum(-1), torch.full((64,), gate.routed_scaling_factor), atol=1e-5)


def test_gradient_checkpointing_gives_identical_gradients():
    def grads(checkpointing: bool):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(1)
        ids = torch.randint(0, 128, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=0, rtol=0, msg=name)


def test_logits_to_keep_boolean_selects_positions():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 10))
    keep = torch.zeros(2, 10, dtype=torch.bool)
    keep[0, 3], keep[1, 7], keep[1, 0] = True, True, True
    with torch.no_grad():
        full = model(input_ids=ids).logits
        selected = model(input_ids=ids, logits_to_keep=keep).logits
    assert selected.shape == (3, 128)
    torch.testing.assert_close(selected, full[keep])


def test_unknown_implementations_are_refused_with_valid_names():
    model = tiny_model()
    with pytest.raises(ValueError, match="sdpa"):
        model.set_attn_implementation("no_such_attention")
    with pytest.raises((ValueError, KeyError), match="grouped_mm"):
        model.set_experts_implementation("no_such_experts")
