"""Held-out evaluation beyond the diffusion loss: a Monte-Carlo ELBO over a fixed grid of mask rates, and
generation-based exact match for datasets that carry a reference `answer`.

ELBO (MDLM / BD3-LM): -log p(x) <= integral over t in (0, 1] of (1/t) E[sum over masked i of -log p(x_i | x_t)].
With the response-token count R, the grid of rates t_k (midpoint rule) gives the per-token bound
`mean_k CE_sum(t_k) / (t_k * R)`; `elbo_perplexity` is its exponential. `loss_t{t}` is the mean cross-entropy
per masked token at each t, the per-t buckets that show where the model is weak.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..data.arithmetic import exact_match, extract_answer
from ..data.sampler import ReplicaEvalBatchSampler
from .forward import diffusion_step


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
    # This replica's share, the same number of batches on every rank (FSDP forwards are collectives).
    batches = ReplicaEvalBatchSampler(num_items=len(dataset), batch_size=trainer.args.per_device_eval_batch_size,
                                      data_parallel_rank=trainer.parallel_state.dp_rank,
                                      data_parallel_size=trainer.parallel_state.dp_size)
    response_tokens = sum(n - p for n, p in zip(dataset["num_tokens"], dataset["prompt_length"]))
    if "assistant_masks" in dataset.column_names:  # multi-turn chats: only the assistant turns are ever masked
        response_tokens = sum(sum(mask) if mask else n - p for mask, n, p in
                              zip(dataset["assistant_masks"], dataset["num_tokens"], dataset["prompt_length"]))
    metrics, nll_terms = {}, []
    for rate in trainer.args.eval_mask_rates:
        # The bound is over the masking process alone: no edit stream, no kept-token supervision.
        collator = replace(trainer._eval_collator, fixed_mask_rate=rate, complementary_masking=False,
                           edit_noise_rate=0.0, supervise_kept=False)
        ce_sum = supervised = 0.0
        for index, items in enumerate(batches):
            batch = trainer._prepare_inputs(collator([dataset[i] for i in items]))
            step = diffusion_step(model, batch, trainer.objective,
                                  attn_implementation=trainer._attn_implementation(model),
                                  mask_dtype=trainer._mask_dtype(model), sequence_shard=trainer.sequence_shard)
            if index < batches.num_real_batches:
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
def generate_answers(model, tokenizer, dataset, *, num_samples: int, gen_length: int, block_length: int,
                     threshold: float, mask_token_id: int, batch_size: int = 8, indices: list[int] | None = None,
                     **decoding):
    """Answer the first `num_samples` rows (documents with an `answer` column) by block-diffusion generation;
    `decoding`: more `generate` arguments (e.g. `edit_threshold`)."""
    if "answer" not in dataset.column_names:
        raise ValueError("Generation-based evaluation needs an `answer` column in the evaluation dataset.")
    indices = list(range(min(num_samples, len(dataset)))) if indices is None else indices
    # The sampler builds dense 4D masks; a model trained with flex attention (GPU) decodes with sdpa.
    trained_with = model.config._attn_implementation
    if trained_with not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")
    try:
        return _answer_batches(model, tokenizer, dataset, indices, gen_length=gen_length,
                               block_length=block_length, threshold=threshold, mask_token_id=mask_token_id,
                               batch_size=batch_size, **decoding)
    finally:
        if trained_with not in ("sdpa", "eager"):
            model.set_attn_implementation(trained_with)


def _answer_batches(model, tokenizer, dataset, indices, *, gen_length, block_length, threshold, mask_token_id,
                    batch_size, **decoding) -> list[dict]:
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
            predicted = extract_answer(text)
            records.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True), "completion": text,
                            "predicted": predicted, "answer": row["answer"], "num_tokens": len(output),
                            "correct": exact_match(text, str(row["answer"]))})
    return records


def evaluate_generation(trainer, dataset, *, prefix: str = "eval") -> dict[str, float]:
    num_samples = min(trainer.args.eval_generation_samples, len(dataset))
    # Decoding takes a data-dependent number of steps, each a collective forward under FSDP: there every rank
    # decodes every item in lockstep (the same tokens, counted once); otherwise each data replica its share.
    indices = list(range(num_samples)) if trainer.is_fsdp_enabled else _replica_share(trainer, num_samples)
    model = trainer.accelerator.unwrap_model(trainer.model)
    records = generate_answers(
        model, trainer.processing_class, dataset, num_samples=num_samples, gen_length=trainer.args.eval_gen_length,
        block_length=trainer.args.block_size, threshold=trainer.args.eval_gen_threshold,
        mask_token_id=trainer.mask_token_id, batch_size=trainer.args.per_device_eval_batch_size, indices=indices,
    )
    correct, total = [sum(r["correct"] for r in records), len(records)]
    if not trainer.is_fsdp_enabled:
        correct, total = _reduce(trainer, [correct, total])
    return {f"{prefix}_exact_match": correct / max(total, 1.0), f"{prefix}_generated_samples": total}
