"""Forward (noising) process of masked diffusion SFT: mask rate t, x_t from x_0, complementary pairs, and the
token-to-token edit stream of draft-and-edit training (LLaDA2.1, `edit_document`).

Usage, per document (the collator draws the noise, see docs/design.md)::

    generator = document_generator(seed, sample_index, epoch)
    t = float(sample_mask_rate(1, low, high, generator)[0])
    x_t, is_masked = mask_document(x_0, prompt_length, t, mask_token_id, generator)
    # optional second instance, every response token supervised exactly once per pair:
    x_t_c, is_masked_c = complementary_pair(x_0, prompt_length, is_masked, mask_token_id)
    t_c = complement_mask_rate(t)
    # optional draft-and-edit stream: some visible response tokens replaced by random ones
    x_t, is_edited = edit_document(x_t, prompt_length, is_masked, edit_rate, edit_token_ids, generator)

Choices and their costs:

- Noise is seeded per document from (seed, sample_index, epoch), not from a stream shared by
  the batch, so the same document gets the same x_t whatever the batch composition, packing,
  number of ranks or resume point. Cost: one `torch.Generator` per document (~µs).
- `min_masked` (default 1) forces the smallest-u response positions to be masked when fewer
  than `min_masked` were drawn, so no document is silently unsupervised. This happens with
  probability (1 - t)^R for R response tokens (0.7^10 ~ 2.8% for a 10-token response at
  t = 0.3, negligible above ~30 tokens); the ELBO weight keeps the nominal t.
- The complement is weighted with the nominal rate 1 - t (see `complement_mask_rate`).
- Multi-turn chats: `supervisable` ([n] bool, the assistant turns' tokens) restricts masking, editing and the
  complement to those positions; the user turns after `prompt_length` stay clean in x_t, like the prompt. The
  draws are the same as without it (one uniform per position from `prompt_length` on), so an all-True
  `supervisable` gives exactly the tensors of `supervisable=None`.

All functions take CPU tensors (the collator runs on CPU) and are pure apart from the
generator they advance.
"""

from __future__ import annotations

import hashlib
import math
import operator

import torch


def validate_noise_range(low: float, high: float) -> None:
    """Raise `ValueError` unless 0 < low <= high <= 1 (the mask-rate band t ~ U[low, high])."""
    for name, value in (("noise_range_low", low), ("noise_range_high", high)):
        try:
            finite = math.isfinite(float(value))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise ValueError(f"{name} ({value!r}) must be a finite number in (0, 1]; e.g. 0.3 and 0.8")
    if not 0.0 < low <= 1.0:
        raise ValueError(
            f"noise_range_low ({low}) must be in (0, 1]: a mask rate of 0 supervises nothing and makes "
            "the 1/t ELBO weight infinite; use a small positive value such as 0.05"
        )
    if not 0.0 < high <= 1.0:
        raise ValueError(
            f"noise_range_high ({high}) must be in (0, 1]: it is a probability of masking a token; "
            "use at most 1.0"
        )
    if low > high:
        raise ValueError(
            f"noise_range_low ({low}) must be <= noise_range_high ({high}); swap them or set them "
            "equal for a fixed mask rate"
        )


def sample_mask_rate(
    num_samples: int, low: float, high: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw `num_samples` mask rates t ~ U[low, high] as float32 [num_samples]."""
    validate_noise_range(low, high)
    if num_samples < 0:
        raise ValueError(f"num_samples ({num_samples}) must be >= 0")
    u = torch.rand(num_samples, generator=generator, dtype=torch.float32)
    return low + (high - low) * u


def _validate_document(x_0: torch.Tensor, prompt_length: int) -> None:
    if not isinstance(x_0, torch.Tensor) or x_0.dim() != 1:
        shape = tuple(x_0.shape) if isinstance(x_0, torch.Tensor) else type(x_0).__name__
        raise ValueError(f"x_0 ({shape}) must be a 1-D LongTensor of one document's token ids")
    if not 0 <= prompt_length < x_0.numel():
        raise ValueError(
            f"prompt_length ({prompt_length}) must satisfy 0 <= prompt_length < len(x_0) "
            f"({x_0.numel()}): every document needs at least one response token; drop rows whose "
            "prompt fills the whole document during preprocessing"
        )


def _validate_supervisable(supervisable: torch.Tensor | None, x_0: torch.Tensor, prompt_length: int) -> None:
    if supervisable is None:
        return
    if supervisable.shape != x_0.shape or supervisable.dtype != torch.bool:
        raise ValueError(f"supervisable ({tuple(supervisable.shape)}, {supervisable.dtype}) must be a bool tensor "
                         f"shaped like x_0 ({tuple(x_0.shape)}): True on the assistant turns' tokens")
    if bool(supervisable[:prompt_length].any()):
        raise ValueError(f"supervisable marks a prompt position (< prompt_length={prompt_length}); the prompt is "
                         "never supervised: start prompt_length at the first assistant token")


def _response_supervisable(supervisable: torch.Tensor | None, prompt_length: int, num_response: int,
                           device) -> torch.Tensor:
    """bool [num_response]: which response positions (from prompt_length on) may be noised and supervised."""
    if supervisable is None:
        return torch.ones(num_response, dtype=torch.bool, device=device)
    return supervisable[prompt_length:]


def mask_document(
    x_0: torch.Tensor,
    prompt_length: int,
    t: float,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    *,
    min_masked: int = 1,
    supervisable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each response token of one document independently with probability t.

    x_0: [n] clean token ids; positions < prompt_length are the prompt and are never masked.
    Returns `(x_t, is_masked)`, both [n]: x_t is x_0 with masked positions replaced by
    `mask_token_id`, is_masked the bool mask (False on the whole prompt).

    If fewer than `min_masked` response tokens were drawn, the response positions with the
    smallest uniform draws are masked until min(min_masked, R) are, R = number of response
    tokens. Those positions are a uniformly random choice among the unmasked ones, and the
    drawn set is always a subset of the final one. `min_masked=0` keeps the pure Bernoulli(t)
    draw, which may mask nothing.

    supervisable: optional bool [n], the positions that may be masked (multi-turn: the assistant turns); R then
    counts those only. None: every position from prompt_length on.
    """
    _validate_document(x_0, prompt_length)
    _validate_supervisable(supervisable, x_0, prompt_length)
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t ({t}) must be in [0, 1]: it is the probability of masking a response token")
    if min_masked < 0:
        raise ValueError(f"min_masked ({min_masked}) must be >= 0; use 0 to never force a masked token")

    num_response = x_0.numel() - prompt_length
    u = torch.rand(num_response, generator=generator, device=x_0.device)
    allowed = _response_supervisable(supervisable, prompt_length, num_response, x_0.device)
    is_masked_response = (u < t) & allowed  # P(u < t) = t for u ~ U[0, 1)
    num_forced = min(min_masked, int(allowed.sum()))
    if int(is_masked_response.sum()) < num_forced:
        # The k smallest draws: a superset of {u < t}, so forcing only ever adds masks.
        candidates = u if supervisable is None else u.masked_fill(~allowed, float("inf"))
        is_masked_response[torch.topk(candidates, num_forced, largest=False).indices] = True

    is_masked = torch.zeros_like(x_0, dtype=torch.bool)
    is_masked[prompt_length:] = is_masked_response
    x_t = x_0.masked_fill(is_masked, mask_token_id)
    return x_t, is_masked


def validate_edit_noise_rate(rate: float) -> None:
    """Raise `ValueError` unless 0 <= rate < 1 (the probability of replacing a visible response token)."""
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and 0.0 <= rate < 1.0):
        raise ValueError(f"edit_noise_rate ({rate!r}) must be in [0, 1): the probability that a response token "
                         "left visible is replaced by a random token (0 = off; LLaDA2.1-style training uses a "
                         "small rate such as 0.1)")


def edit_document(
    x_t: torch.Tensor,
    prompt_length: int,
    is_masked: torch.Tensor,
    rate: float,
    edit_token_ids: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    supervisable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-to-token (T2T) stream of draft-and-edit training (LLaDA2.1): replace each response token that
    masking left visible by a random token with probability `rate`.

    x_t: [n] the masked document (`mask_document`'s output); is_masked: [n] bool. edit_token_ids: [C] long, the
    ids a replacement is drawn from (the vocabulary minus special tokens, C >= 2). The replacement is uniform over
    `edit_token_ids` minus the position's own token, so an edit always changes the token. Prompt and masked
    positions are never touched. Returns `(x_t_edited, is_edited)`, both [n].

    Draws from `generator` after the mask draws, so with `rate = 0` nothing is drawn and the mask stream of the
    document is the same as without editing. `supervisable` (bool [n], as in `mask_document`) keeps the edits on
    those positions.
    """
    _validate_document(x_t, prompt_length)
    _validate_supervisable(supervisable, x_t, prompt_length)
    validate_edit_noise_rate(rate)
    if edit_token_ids.dim() != 1 or edit_token_ids.numel() < 2:
        raise ValueError(f"edit_token_ids ({tuple(edit_token_ids.shape)}) must be a 1-D tensor of at least 2 ids to "
                         "draw replacements from")
    is_edited = torch.zeros_like(is_masked)
    if rate == 0.0:
        return x_t, is_edited
    num_response = x_t.numel() - prompt_length
    u = torch.rand(num_response, generator=generator)
    pick = torch.rand(num_response, generator=generator)
    visible = x_t[prompt_length:]
    allowed = _response_supervisable(supervisable, prompt_length, num_response, x_t.device)
    is_edited[prompt_length:] = (u < rate) & ~is_masked[prompt_length:] & allowed
    # Uniform over the candidates minus the own token: draw among the first C - 1 candidates when the own token
    # is one of them, and read a draw of the own token as the last candidate (which the draw excludes).
    own_is_candidate = torch.isin(visible, edit_token_ids)
    num_choices = edit_token_ids.numel() - own_is_candidate.long()
    index = (pick * num_choices).long().clamp(max=edit_token_ids.numel() - 1)
    replacement = edit_token_ids[index]
    replacement = torch.where(replacement == visible, edit_token_ids[-1], replacement)
    x_t = x_t.clone()
    x_t[prompt_length:] = torch.where(is_edited[prompt_length:], replacement, visible)
    return x_t, is_edited


def complementary_pair(
    x_0: torch.Tensor, prompt_length: int, is_masked: torch.Tensor, mask_token_id: int, *,
    supervisable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The complementary instance of `mask_document`'s output: mask exactly the response tokens it left clean.

    Returns `(x_t_complement, is_masked_complement)`, both [n]. Together with `is_masked` every
    response token is masked in exactly one of the two instances and no prompt token in either.
    The complement masks nothing when `is_masked` covered the whole response (t = 1, or a very
    short response): it then supervises no token, which the loss handles (empty micro-batches
    give a loss of 0); a collator may also drop it.
    Weight it with `complement_mask_rate(t)`. `supervisable` (bool [n], as in `mask_document`): the complement
    covers only those positions.
    """
    _validate_document(x_0, prompt_length)
    _validate_supervisable(supervisable, x_0, prompt_length)
    if is_masked.shape != x_0.shape or is_masked.dtype != torch.bool:
        raise ValueError(
            f"is_masked ({tuple(is_masked.shape)}, {is_masked.dtype}) must be a bool tensor shaped like "
            f"x_0 ({tuple(x_0.shape)}); pass the second output of mask_document"
        )
    if bool(is_masked[:prompt_length].any()):
        raise ValueError(
            f"is_masked masks a prompt position (< prompt_length={prompt_length}); prompt tokens are "
            "never masked: pass the mask returned by mask_document with the same prompt_length"
        )
    is_response = torch.arange(x_0.numel(), device=x_0.device) >= prompt_length
    is_masked_complement = is_response & ~is_masked
    if supervisable is not None:
        is_masked_complement &= supervisable
    return x_0.masked_fill(is_masked_complement, mask_token_id), is_masked_complement


def complement_mask_rate(t: float) -> float:
    """Mask rate to record (and weight by, 1/t in ELBO mode) for the complement of a rate-t instance: 1 - t.

    Why the nominal 1 - t and not the fraction actually masked: each response token of the
    complement is masked independently with probability exactly 1 - t (it is the complement of
    independent Bernoulli(t) draws), so the complement *is* a forward-process sample at rate
    1 - t and 1/(1 - t) is the importance weight that keeps the ELBO estimate unbiased. The
    realised fraction would make the weight depend on the draw (a ratio estimator, biased, and
    noisy on short responses) and would treat the two members of a pair inconsistently, since
    the primary instance is weighted by its nominal t. Consequence for configuration: with
    complementary masking and ELBO weighting the complement's weight is up to 1/(1 - high),
    so keep noise_range_high below 1 (e.g. 0.8 -> weights up to 5).
    """
    return 1.0 - float(t)


# Distinct personalisation keeps these streams apart from any other blake2b use in the package.
_GENERATOR_PERSON = b"dfhf-noise-v1"


def document_generator(seed: int, sample_index: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from (seed, sample_index, epoch) alone.

    The three integers are hashed (blake2b, 64-bit digest) rather than added or multiplied, so
    neighbouring triples such as (0, 1, 0) and (0, 0, 1), or (1, 0, 0) and (0, 1, 0), give
    unrelated streams. The same triple always gives the same stream, so x_t is reproducible
    and resumable regardless of batching order, packing or the number of ranks.
    """
    values = []
    for name, value in (("seed", seed), ("sample_index", sample_index), ("epoch", epoch)):
        try:
            values.append(operator.index(value))
        except TypeError:
            raise ValueError(f"{name} ({value!r}) must be an integer") from None
    if values[1] < 0 or values[2] < 0:
        raise ValueError(
            f"sample_index ({values[1]}) and epoch ({values[2]}) must be >= 0; pass the row's index "
            "in the prepared dataset and the 0-based epoch"
        )
    payload = ",".join(str(v) for v in values).encode()
    digest = hashlib.blake2b(payload, digest_size=8, person=_GENERATOR_PERSON).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little"))
    return generator
