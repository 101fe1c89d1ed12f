"""Diffusion loss against a literal per-position restatement; chunking, empty batches, normalisation."""

import re

import pytest
import torch

from dfactory_hf.diffusion.loss import diffusion_loss, gather_supervised, loss_weights

VOCAB = 11


def _packed_batch(seed: int = 0):
    """Two rows of packed documents: (logits [B, L, V], labels [B, L], mask_rate [B, L], position_ids [B, L]).

    Row 0: a document with a 3-token prompt (L 0..7), one with prompt_length 0 (8..11), padding.
    Row 1: one document with a 2-token prompt over the whole row.
    """
    generator = torch.Generator().manual_seed(seed)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 0], list(range(14))])
    mask_rate = torch.tensor([[0.3] * 8 + [0.6] * 4 + [0.0] * 2, [0.45] * 14])
    is_response = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [0, 0] + [1] * 12]).bool()
    is_masked = is_response & (torch.rand(2, 14, generator=generator) < 0.6)
    is_masked[0, 8] = True  # a supervised first token of a packed document
    x_0 = torch.randint(0, VOCAB, (2, 14), generator=generator)
    labels = torch.where(is_masked, x_0, torch.full_like(x_0, -100))
    logits = torch.randn(2, 14, VOCAB, generator=generator) * 3
    # Make about half the predictions correct so CAP has positions with and without entropy.
    predicted_next = logits.argmax(-1).roll(-1, dims=1)
    labels = torch.where(is_masked & (torch.arange(14) % 2 == 0), logits.argmax(-1), labels)
    labels = torch.where(is_masked & (torch.arange(14) % 4 == 1), predicted_next, labels)
    return logits, labels, mask_rate, position_ids


def _literal_loss(logits, labels, mask_rate, position_ids, *, shift, mode, beta, num_items):
    """The objective restated one position at a time, in float64."""
    total = 0.0
    num_tokens = 0
    batch_size, seq_len = labels.shape
    for b in range(batch_size):
        for p in range(seq_len):
            target_position = p + 1 if shift else p
            if target_position >= seq_len or labels[b, target_position] == -100:
                continue
            if shift and position_ids[b, target_position] == 0:
                continue  # never predict the first token of the next document
            row = logits[b, p].double()
            target = int(labels[b, target_position])
            log_probs = torch.log_softmax(row, dim=-1)
            weight = 1.0 if mode == "mean" else 1.0 / float(mask_rate[b, target_position])
            total = total + weight * -log_probs[target]
            if int(row.argmax()) == target:
                total = total + beta * -(log_probs.exp() * log_probs).sum()
            num_tokens += 1
    return total / (num_items if num_items is not None else max(num_tokens, 1)), num_tokens


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("mode", ["mean", "elbo"])
@pytest.mark.parametrize("beta", [0.0, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("num_items", [None, 40])
def test_loss_matches_literal_restatement(shift, mode, beta, chunk_size, num_items):
    logits, labels, mask_rate, position_ids = _packed_batch()
    full_logits = logits.clone().requires_grad_()
    selector, targets = gather_supervised(labels, shift=shift, position_ids=position_ids)
    weights = loss_weights(mask_rate[selector], mode)
    out = diffusion_loss(
        full_logits[selector], targets, weights=weights, num_items=num_items, confidence_beta=beta, chunk_size=chunk_size
    )
    reference_logits = logits.clone().requires_grad_()
    expected, num_tokens = _literal_loss(
        reference_logits, labels, mask_rate, position_ids, shift=shift, mode=mode, beta=beta, num_items=num_items
    )
    assert out.num_tokens == num_tokens > 5
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(full_logits.grad, reference_logits.grad.float(), rtol=1e-5, atol=1e-6)

    # The reported statistics, restated.
    kept_logits = logits[selector].double()
    log_probs = kept_logits.log_softmax(-1)
    is_correct = kept_logits.argmax(-1) == targets
    assert 0 < int(out.num_correct) < num_tokens
    assert int(out.num_correct) == int(is_correct.sum())
    torch.testing.assert_close(out.ce_sum.double(), -log_probs.gather(1, targets[:, None]).sum(), rtol=1e-6, atol=1e-6)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    torch.testing.assert_close(out.cap_sum.double(), entropy[is_correct].sum(), rtol=1e-6, atol=1e-6)
    assert not out.ce_sum.requires_grad and not out.cap_sum.requires_grad


def test_gather_supervised_alignment():
    labels = torch.tensor([[-100, 5, 6, -100, 7], [8, -100, -100, 9, -100]])
    selector, targets = gather_supervised(labels, shift=False)
    assert selector.tolist() == [[False, True, True, False, True], [True, False, False, True, False]]
    assert targets.tolist() == [5, 6, 7, 8, 9]
    selector, targets = gather_supervised(labels, shift=True)
    assert selector.tolist() == [[True, True, False, True, False], [False, False, True, False, False]]
    assert targets.tolist() == [5, 6, 7, 9]  # 8 sits at p = 0: nothing predicts it
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]])
    selector, targets = gather_supervised(labels, shift=True, position_ids=position_ids)
    assert selector.tolist() == [[True, True, False, True, False], [False, False, False, False, False]]
    assert targets.tolist() == [5, 6, 7]  # 9 starts a document: not predicted across the boundary


@pytest.mark.parametrize("chunk_size", [None, 2, 5])
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_chunked_equals_unchunked_values_and_gradients(chunk_size, beta):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(13, 50, generator=generator) * 4
    labels = torch.randint(0, 50, (13,), generator=generator)
    labels[::3] = logits[::3].argmax(-1)
    weights = 1.0 / (0.2 + torch.rand(13, generator=generator))

    def run(chunk):
        leaf = logits.clone().requires_grad_()
        out = diffusion_loss(leaf, labels, weights=weights, num_items=20, confidence_beta=beta, chunk_size=chunk)
        out.loss.backward()
        return out, leaf.grad

    reference, reference_grad = run(None)
    chunked, chunked_grad = run(chunk_size)
    torch.testing.assert_close(chunked.loss, reference.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked.ce_sum, reference.ce_sum, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked.cap_sum, reference.cap_sum, rtol=0, atol=1e-6)
    assert int(chunked.num_correct) == int(reference.num_correct) >= 5
    torch.testing.assert_close(chunked_grad, reference_grad, rtol=0, atol=1e-6)


def test_chunked_loss_keeps_no_fp32_logits_for_backward():
    logits = torch.randn(64, 1000).bfloat16().requires_grad_()
    labels = torch.randint(0, 1000, (64,))
    for chunk_size, expect_fp32_vocab_tensor in [(None, True), (16, False)]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            diffusion_loss(logits, labels, confidence_beta=2.0, chunk_size=chunk_size)
        kept_fp32 = any(t.dtype == torch.float32 and t.shape[-1] == 1000 for t in saved)
        assert kept_fp32 == expect_fp32_vocab_tensor
        if chunk_size is not None:  # only the bf16 chunks themselves, recomputed in backward
            assert max(t.shape[0] for t in saved if t.dim() == 2) == chunk_size


@pytest.mark.parametrize("num_items", [None, 0, 7, torch.tensor(0), torch.tensor(7)])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_empty_micro_batch_gives_zero_loss_and_finite_gradients(num_items, chunk_size):
    lm_head = torch.nn.Linear(8, VOCAB)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    selector, targets = gather_supervised(torch.full((2, 6), -100), shift=False)
    logits = lm_head(hidden[selector])  # [0, V]
    out = diffusion_loss(
        logits, targets, weights=loss_weights(torch.zeros(0), "elbo"), num_items=num_items,
        confidence_beta=2.0, chunk_size=chunk_size,
    )
    assert out.loss.item() == 0.0 and out.num_tokens == 0 and int(out.num_correct) == 0
    assert out.loss.requires_grad
    out.loss.backward()
    for grad in (lm_head.weight.grad, lm_head.bias.grad, hidden.grad):
        assert grad is not None and torch.isfinite(grad).all() and not grad.any()


def test_micro_batch_losses_sum_to_the_global_token_mean():
    generator = torch.Generator().manual_seed(2)
    sizes = [5, 0, 9, 3]
    num_items = sum(sizes)
    logits = torch.randn(num_items, 30, generator=generator)
    labels = torch.randint(0, 30, (num_items,), generator=generator)
    labels[::2] = logits[::2].argmax(-1)
    weights = loss_weights(0.1 + 0.9 * torch.rand(num_items, generator=generator), "elbo")
    whole = diffusion_loss(logits, labels, weights=weights, num_items=num_items, confidence_beta=2.0)
    for count in (num_items, torch.tensor(num_items)):
        parts = [
            diffusion_loss(lg, lb, weights=w, num_items=count, confidence_beta=2.0).loss
            for lg, lb, w in zip(logits.split(sizes), labels.split(sizes), weights.split(sizes))
        ]
        torch.testing.assert_close(sum(parts), whole.loss, rtol=1e-6, atol=1e-6)
    # Without num_items each micro-batch is its own mean: the sum is not the global mean.
    local = sum(diffusion_loss(lg, lb).loss for lg, lb in zip(logits.split(sizes), labels.split(sizes)))
    assert not torch.isclose(local, diffusion_loss(logits, labels, num_items=num_items).loss)


def test_bf16_logits_are_computed_in_fp32():
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, 300, generator=generator) * 8).bfloat16()
    labels = torch.randint(0, 300, (16,), generator=generator)
    labels[::2] = logits[::2].float().argmax(-1)
    for chunk_size in (None, 5):
        leaf = logits.clone().requires_grad_()
        out = diffusion_loss(leaf, labels, confidence_beta=2.0, chunk_size=chunk_size)
        reference = diffusion_loss(logits.float(), labels, confidence_beta=2.0)
        assert out.loss.dtype == out.ce_sum.dtype == out.cap_sum.dtype == torch.float32
        torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.ce_sum, reference.ce_sum, rtol=0, atol=1e-5)
        out.loss.backward()
        assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad).all()
    # A bf16 softmax would round visibly: the fp32 result is not what bf16 arithmetic gives.
    bf16_ce = -logits.log_softmax(-1).gather(1, labels[:, None]).sum().float()
    assert not torch.isclose(bf16_ce, reference.ce_sum, rtol=0, atol=1e-4)


def test_loss_weights_modes():
    mask_rate = torch.tensor([0.25, 0.5, 1.0])
    assert torch.equal(loss_weights(mask_rate, "mean"), torch.ones(3))
    torch.testing.assert_close(loss_weights(mask_rate, "elbo"), torch.tensor([4.0, 2.0, 1.0]))
    assert loss_weights(mask_rate.double(), "elbo").dtype == torch.float32


def test_validation_messages():
    logits, labels = torch.randn(4, VOCAB), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape("mode ('ELBO') must be one of 'mean', 'elbo'")):
        loss_weights(torch.ones(2), "ELBO")
    with pytest.raises(ValueError, match=re.escape("num_items (3) must be >= the supervised tokens of this micro-batch (4)")):
        diffusion_loss(logits, labels, num_items=3)
    with pytest.raises(ValueError, match=re.escape("confidence_beta (-1.0) must be >= 0")):
        diffusion_loss(logits, labels, confidence_beta=-1.0)
    with pytest.raises(ValueError, match=re.escape("chunk_size (0) must be a positive int or None")):
        diffusion_loss(logits, labels, chunk_size=0)
    with pytest.raises(ValueError, match=re.escape("weights ((3,)) must be [N] like labels ((4,))")):
        diffusion_loss(logits, labels, weights=torch.ones(3))
    with pytest.raises(ValueError, match=re.escape("logits ((2, 2, 11)) must be [N, vocab] and labels ((4,)) [N]")):
        diffusion_loss(logits.view(2, 2, VOCAB), labels)
    with pytest.raises(ValueError, match=re.escape("labels ((4,)) must be [batch, seq_len]")):
        gather_supervised(labels, shift=False)


@pytest.mark.parametrize("chunk_size", [None, 4, 100])
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_fused_head_loss_equals_the_loss_of_the_heads_logits(chunk_size, beta):
    # head_weight: the loss applies the LM head itself; values, metrics and gradients (hidden and weight) are
    # those of passing the head's logits, in float64 to the last bits.
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(13, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 40, (13,), generator=generator)
    labels[::2] = (hidden @ weight.T)[::2].argmax(-1)
    weights, groups = 1.0 / (0.2 + torch.rand(13, generator=generator)), torch.randint(0, 3, (13,), generator=generator)

    def run(fused):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = diffusion_loss(h if fused else torch.nn.functional.linear(h, w), labels, weights=weights, num_items=20,
                             confidence_beta=beta, chunk_size=chunk_size, groups=groups, num_groups=3,
                             head_weight=w if fused else None)
        out.loss.backward()
        return out, h.grad, w.grad

    (reference, *reference_grads), (fused, *fused_grads) = run(False), run(True)
    for name in ("loss", "ce_sum", "cap_sum", "group_ce_sum"):
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), rtol=0, atol=1e-12)
    assert int(fused.num_correct) == int(reference.num_correct) >= 6
    assert fused.group_correct.tolist() == reference.group_correct.tolist()
    for got, want in zip(fused_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_fused_head_loss_keeps_no_vocab_wide_tensor_for_backward():
    hidden, weight = torch.randn(64, 8, requires_grad=True), torch.randn(1000, 8, requires_grad=True)
    labels = torch.randint(0, 1000, (64,))
    for head_weight, expect_logits_kept in [(None, True), (weight, False)]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            inputs = hidden if head_weight is not None else torch.nn.functional.linear(hidden, weight)
            diffusion_loss(inputs, labels, confidence_beta=2.0, chunk_size=16, head_weight=head_weight)
        # Saved: the weight itself [1000, 8] and hidden chunks; never a [rows, 1000] logits tensor.
        assert any(t.dim() == 2 and t.shape[1] == 1000 for t in saved) == expect_logits_kept


def test_fused_head_loss_of_an_empty_micro_batch_reaches_the_head_weight():
    weight, hidden = torch.randn(VOCAB, 8, requires_grad=True), torch.randn(0, 8, requires_grad=True)
    out = diffusion_loss(hidden, torch.zeros(0, dtype=torch.long), confidence_beta=2.0, head_weight=weight)
    out.loss.backward()
    assert out.loss.item() == 0.0 and weight.grad is not None and not weight.grad.any()
    with pytest.raises(ValueError, match=r"head_weight \(\(40, 7\)\) must be \[vocab, hidden\] with hidden = 8"):
        diffusion_loss(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), head_weight=torch.randn(40, 7))
