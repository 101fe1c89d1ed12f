"""Held-out evaluation beyond the diffusion loss: a Monte-Carlo ELBO over a fixed grid of mask rates, and
generation-based accuracy for datasets that carry a reference `answer`, scored by a callable the caller passes
(`DiffusionTrainer(answer_scorer=...)`; the arithmetic demo passes `dfactory_hf.demo.arithmetic.exact_match`).

ELBO (MDLM / BD3-LM): -log p(x) <= integral over t in (0, 1] of (1/t) E[sum over masked i of -log p(x_i | x_t)].
With the response-token count R, the grid of rates t_k (midpoint rule) gives the per-token bound
`mean_k CE_sum(t_k) / (t_k * R)`; `elbo_perplexity` is its exponential. `loss_t{t}` is the mean cross-entropy
per masked token at each t, the per-t buckets that show where the model is weak.

Both run through the trainer's public surface: `get_eval_dataloader(dataset, mask_rate=t)` gives the batches of
rate t, `diffusion_step` runs them, `parallel_state` reduces the sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..data.sampler import ReplicaEvalBatchSampler

AnswerScorer = Callable[[str, str], bool]  # (generated text, reference answer) -> correct


def _replica_share(trainer, num_items: int) -> list[int]:
    """This data replica's share of item indices."""
    state = trainer.parallel_state
    return list(range(state.dp_rank, num_items, state.dp_size))


def _reduce(trainer, values: list[float], *, over_every_rank: bool = False) -> list[float]:
    """Sum over data replicas (one value per replica), or over every rank for per-rank partial sums."""
    tensor = torch.tensor(values, dtype=torch.float64, device=trainer.args.device)
    state = trainer.parallel_state
    return (state.sum_over_world(tensor) if over_every_rank else state.sum_over_data(tensor)).tolist()


@torch.no_grad()
def evaluate_elbo(trainer, dataset, *, prefix: str = "eval") -> dict[str, float]:
    model = trainer.model
    was_training = model.training
    model.eval()
    response_tokens = sum(n - p for n, p in zip(dataset["num_tokens"], dataset["prompt_length"]))
    if "assistant_masks" in dataset.column_names:  # multi-turn chats: only the assistant turns are ever masked
        response_tokens = sum(sum(mask) if mask else n - p for mask, n, p in
                              zip(dataset["assistant_masks"], dataset["num_tokens"], dataset["prompt_length"]))
    metrics, nll_terms = {}, []
    # Each pass over a DataLoader draws its base seed from the global generator; training after this evaluation
    # must draw what it would have drawn without the grid.
    with torch.random.fork_rng(devices=[]):
        for rate in trainer.args.eval_mask_rates:
            loader = trainer.get_eval_dataloader(dataset, mask_rate=rate)
            # Every rank runs the same number of batches (FSDP forwards are collectives); fillers are not counted.
            num_real_batches = ReplicaEvalBatchSampler.of(loader).num_real_batches
            ce_sum = supervised = 0.0
            for index, batch in enumerate(loader):
                step = trainer.diffusion_step(model, batch)
                if index < num_real_batches:
                    ce_sum += float(step.loss.ce_sum)
                    supervised += step.loss.num_tokens
            ce_sum, supervised = _reduce(trainer, [ce_sum, supervised], over_every_rank=True)  # sp: partial sums
            metrics[f"{prefix}_loss_t{rate:g}"] = ce_sum / max(supervised, 1.0)
            nll_terms.append(ce_sum / (rate * max(response_tokens, 1)))
    nll = sum(nll_terms) / len(nll_terms)
    metrics[f"{prefix}_elbo_nll"] = nll
    metrics[f"{prefix}_elbo_perplexity"] = math.exp(min(nll, 50.0))
    model.train(was_training)
    return metrics


@torch.no_grad()
def generate_answers(model, tokenizer, dataset, *, score: AnswerScorer, num_samples: int, gen_length: int,
                     block_length: int, threshold: float, mask_token_id: int, batch_size: int = 8,
                     indices: list[int] | None = None, **decoding) -> list[dict]:
    """Answer the first `num_samples` rows (documents with an `answer` column) by block-diffusion generation;
    `score(text, answer)` decides each record's `correct`; `decoding`: more `generate` arguments (e.g.
    `edit_threshold`)."""
    if "answer" not in dataset.column_names:
        raise ValueError("Generation-based evaluation needs an `answer` column in the evaluation dataset.")
    if not callable(score):
        raise ValueError(f"score ({score!r}) must be a callable (generated text, reference answer) -> bool, "
                         "e.g. dfactory_hf.demo.arithmetic.exact_match.")
    indices = list(range(min(num_samples, len(dataset)))) if indices is None else indices
    # The sampler builds dense 4D masks; a model trained with flex attention (GPU) decodes with sdpa.
    trained_with = model.config._attn_implementation
    if trained_with not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")
    try:
        return _answer_batches(model, tokenizer, dataset, indices, score=score, gen_length=gen_length,
                               block_length=block_length, threshold=threshold, mask_token_id=mask_token_id,
                               batch_size=batch_size, **decoding)
    finally:
        if trained_with not in ("sdpa", "eager"):
            model.set_attn_implementation(trained_with)


def _answer_batches(model, tokenizer, dataset, indices, *, score, gen_length, block_length, threshold,
                    mask_token_id, batch_size, **decoding) -> list[dict]:
    from ..generation import generate

    records = []
    for start in range(0, len(indices), batch_size):
        rows = [dataset[i] for i in indices[start:start + batch_size]]
        prompts = [row["input_ids"][: row["prompt_length"]] for row in rows]
        outputs = generate(model, prompts, gen_length=gen_length, block_length=block_length, steps=block_length,
                           threshold=threshold, eos_token_id=tokenizer.eos_token_id, mask_token_id=mask_token_id,
                           **decoding)
        for row, prompt, output in zip(rows, prompts, outputs):
            text = tokenizer.decode(output, skip_special_tokens=True)
            records.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True), "completion": text,
                            "answer": row["answer"], "num_tokens": len(output),
                            "correct": bool(score(text, str(row["answer"])))})
    return records


def evaluate_generation(trainer, dataset, *, prefix: str = "eval") -> dict[str, float]:
    num_samples = min(trainer.args.eval_generation_samples, len(dataset))
    # Decoding takes a data-dependent number of steps, each a collective forward under FSDP: there every rank
    # decodes every item in lockstep (the same tokens, counted once); otherwise each data replica its share.
    indices = list(range(num_samples)) if trainer.is_fsdp_enabled else _replica_share(trainer, num_samples)
    model = trainer.accelerator.unwrap_model(trainer.model)
    records = generate_answers(
        model, trainer.processing_class, dataset, score=trainer.answer_scorer, num_samples=num_samples,
        gen_length=trainer.args.eval_gen_length, block_length=trainer.args.block_size,
        threshold=trainer.args.eval_gen_threshold, mask_token_id=trainer.mask_token_id,
        batch_size=trainer.args.per_device_eval_batch_size, indices=indices,
    )
    correct, total = [sum(r["correct"] for r in records), len(records)]
    if not trainer.is_fsdp_enabled:
        correct, total = _reduce(trainer, [correct, total])
    return {f"{prefix}_exact_match": correct / max(total, 1.0), f"{prefix}_generated_samples": total}
