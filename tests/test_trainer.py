"""DiffusionTrainer: loss against a literal restatement, token weighting, empty batches, drop-in use."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from model_helpers import literal_block_diffusion_mask
from trainer_helpers import TOKENIZER, demo_args, demo_data, demo_model, demo_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from dfactory_hf import DiffusionTrainer


def _equal_length_batch(trainer, length: int):
    rows = [row for row in trainer.train_dataset if row["num_tokens"] == length][:3]
    assert len(rows) == 3
    return trainer.data_collator(rows)


@pytest.mark.parametrize(
    ("same_token_labels", "loss_weighting"), [(True, "mean"), (True, "elbo"), (False, "mean")]
)
def test_compute_loss_equals_literal_restatement(tmp_path, same_token_labels, loss_weighting):
    trainer = demo_trainer(tmp_path, same_token_labels=same_token_labels, loss_weighting=loss_weighting)
    model = trainer.model.eval()
    batch = _equal_length_batch(trainer, 52)
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        # Literal: full [x_t ; x_0] forward under REFERENCE 1's table, logits of the x_t half only.
        mask = literal_block_diffusion_mask(length, 4)[None, None].expand(3, 1, -1, -1)
        positions = torch.arange(length).repeat(3, 2)
        logits = model(input_ids=torch.cat([batch["noisy_input_ids"], batch["input_ids"]], 1),
                       position_ids=positions, attention_mask=mask).logits[:, :length]
    terms, weights = [], []
    for row in range(3):
        for p in range(length):
            target_position = p if same_token_labels else p + 1
            if target_position >= length or batch["labels"][row, target_position] == -100:
                continue
            target = batch["labels"][row, target_position]
            terms.append(-F.log_softmax(logits[row, p], dim=-1)[target])
            t = batch["mask_rate"][row, target_position]
            weights.append(1.0 / t if loss_weighting == "elbo" else torch.tensor(1.0))
    literal = sum(w * x for w, x in zip(weights, terms)) / len(terms)
    torch.testing.assert_close(loss, literal, atol=1e-5, rtol=1e-5)


def test_only_supervised_x_t_positions_reach_lm_head(tmp_path):
    trainer = demo_trainer(tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    rows_seen = []
    hook = trainer.model.lm_head.register_forward_hook(lambda m, inputs, out: rows_seen.append(inputs[0].shape))
    trainer.compute_loss(trainer.model, batch)
    hook.remove()
    supervised = int((batch["labels"] != -100).sum())
    assert rows_seen == [torch.Size([supervised, trainer.model.config.hidden_size])]
    assert supervised < batch["input_ids"].numel() // 2  # far fewer than the L positions, let alone 2L


def test_empty_micro_batch_gives_zero_loss_and_finite_gradients(tmp_path):
    # Pre-noised data whose labels supervise nothing: the public recipe returns NaN here.
    ids = [5, 40, 41, 6, 42, 43, 1, 1]
    rows = [{"input_ids": ids, "prompt_length": 4, "noisy_input_ids": ids, "labels": [-100] * 8}] * 2
    data = {"train": Dataset.from_list(rows), "test": Dataset.from_list(rows)}
    trainer = demo_trainer(tmp_path, data=data)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    count = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    assert int(count) == 0
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=count)
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and g.abs().max() == 0 for g in grads)


def _accumulated_gradients(trainer, batches):
    model = trainer.model
    model.zero_grad()
    count = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    for batch in batches:
        trainer.training_step(model, batch, count)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_4x1_equals_one_batch_of_4(tmp_path):
    trainer = demo_trainer(tmp_path, gradient_accumulation_steps=4)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    # Documents of different lengths: the single batch of 4 pads, the micro-batches of 1 do not.
    lengths = trainer.train_dataset["num_tokens"]
    short = [i for i, n in enumerate(lengths) if n < max(lengths)][:2]
    features = [trainer.train_dataset[i] for i in short + [lengths.index(max(lengths))]]
    features.append(trainer.train_dataset[len(lengths) - 1])
    assert len({f["num_tokens"] for f in features}) > 1
    single = _accumulated_gradients(trainer, [trainer.data_collator(features)])
    accumulated = _accumulated_gradients(trainer, [trainer.data_collator([f]) for f in features])
    for name in single:
        torch.testing.assert_close(accumulated[name], single[name], atol=1e-6, rtol=1e-5, msg=name)


def test_padded_tokens_change_no_real_logit(tmp_path):
    trainer = demo_trainer(tmp_path)
    model = trainer.model.eval()
    lengths = trainer.train_dataset["num_tokens"]
    features = [trainer.train_dataset[lengths.index(min(lengths))], trainer.train_dataset[lengths.index(max(lengths))]]
    batch = trainer.data_collator(features)
    padding = batch["attention_mask"] == 0
    assert padding.any()
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][padding] = 77
    changed["noisy_input_ids"][padding] = 78
    with torch.no_grad():
        step_inputs = []
        for b in (batch, changed):
            selector = torch.ones_like(b["labels"], dtype=torch.bool)
            from dfactory_hf.trainer.forward import model_inputs

            kwargs = model_inputs(b, trainer.objective, attn_implementation="sdpa", mask_dtype=torch.float32,
                                  selector=selector)
            kwargs["logits_to_keep"] = 0
            step_inputs.append(model(**kwargs).logits)
    real = torch.cat([~padding, ~padding], dim=1)
    torch.testing.assert_close(step_inputs[1][real], step_inputs[0][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(trainer.compute_loss(model, changed), trainer.compute_loss(model, batch))


def test_plain_training_arguments_drop_in(tmp_path):
    data = demo_data()
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, max_steps=2, report_to="none",
                             per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)
    trainer = DiffusionTrainer(model=demo_model(), args=args, train_dataset=data["train"],
                               processing_class=TOKENIZER)
    assert trainer.args.block_size == 32 and trainer.args.noise_range_low == 0.3  # diffusion defaults apply
    assert trainer.train_dataset[0]["num_tokens"] % 32 == 0
    output = trainer.train()
    assert output.global_step == 2 and torch.isfinite(torch.tensor(output.training_loss))


def test_training_logs_diffusion_metrics_and_changes_every_parameter(tmp_path):
    trainer = demo_trainer(tmp_path, max_steps=6, logging_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for key in ("ce_loss", "cap_loss", "masked_token_accuracy", "mean_mask_rate", "model_tokens_per_second",
                "real_tokens_per_second", "padding_fraction"):
        assert key in logged[-1], key
    assert 0.3 <= logged[-1]["mean_mask_rate"] <= 0.8
    # Block diffusion processes 2L tokens per row: model tokens exceed twice the real ones.
    assert logged[-1]["model_tokens_per_second"] >= 2 * logged[-1]["real_tokens_per_second"]


def test_evaluate_reports_token_loss_accuracy_and_elbo_buckets(tmp_path):
    trainer = demo_trainer(tmp_path, eval_mask_rates=[0.2, 0.6])
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_masked_token_accuracy", "eval_loss_t0.2", "eval_loss_t0.6", "eval_elbo_nll",
                "eval_elbo_perplexity"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    # A second evaluation draws the same (pinned) noise: every metric but the timings repeats.
    again = trainer.evaluate()
    timings = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
    assert {k: v for k, v in again.items() if k not in timings} == pytest.approx(
        {k: v for k, v in metrics.items() if k not in timings})


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = demo_trainer(tmp_path, report_to="wandb", max_steps=2, logging_steps=1)
    trainer.train()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, os.listdir(tmp_path)


def test_tokenizer_without_mask_token_is_refused(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER.name_or_path)
    tokenizer.mask_token = None
    with pytest.raises(ValueError, match=r"The tokenizer has no mask token and --mask_token_id is not set"):
        DiffusionTrainer(model=demo_model(), args=demo_args(tmp_path), train_dataset=demo_data()["train"],
                         processing_class=tokenizer)


def test_flex_attention_training_on_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"flex_attention has no backward pass on CPU"):
        demo_trainer(tmp_path, model=demo_model(attn_implementation="flex_attention"))


def test_invalid_arguments_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"max_seq_len \(66\) must be a positive multiple of block_size \(4\); use 68"):
        demo_args(tmp_path, max_seq_len=66)
    with pytest.raises(ValueError, match=r"noise_range_low \(0.9\) must be <= noise_range_high \(0.5\)"):
        demo_args(tmp_path, noise_range_low=0.9, noise_range_high=0.5)
    with pytest.raises(ValueError, match=r"loss_weighting \('sum'\) must be one of \('mean', 'elbo'\)"):
        demo_args(tmp_path, loss_weighting="sum")
    with pytest.raises(ValueError, match=r"packing=True and pad_to_max_seq_len=True exclude each other"):
        demo_args(tmp_path, packing=True, pad_to_max_seq_len=True)


def test_data_problems_are_skipped_counted_and_reported(tmp_path, capsys):
    good = demo_data()["train"].to_list()[:8]
    bad = [
        {"messages": [{"role": "user", "content": "no answer here"}], "answer": "1"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}], "answer": "1"},
        {"messages": [{"role": "user", "content": "q <|mask|>"}, {"role": "assistant", "content": "a"}],
         "answer": "1"},
    ]
    data = {"train": Dataset.from_list(good + bad), "test": Dataset.from_list(good[:2])}
    trainer = demo_trainer(tmp_path, data=data, max_steps=2)
    trainer.train()
    out = capsys.readouterr().out
    assert "train data: 8 documents from 11 rows" in out
    assert "skipped 1: conversation has no assistant turn (first at row 8)" in out
    assert "skipped 1: empty assistant content (first at row 9)" in out
    assert "the mask token (id 2) appears inside the data (first at row 10)" in out
    assert (tmp_path / "out" / "data_report.json").exists()


def test_fused_head_loss_trains_like_the_logits_path_and_never_makes_logits(tmp_path):
    # --fused_head_loss: the loss applies the LM head inside the head's call; the training run matches the
    # logits path (SGD: Adam would magnify rounding in near-zero gradients), and the head returns no vocab-wide
    # logits (a silent fallback to the logits path fails here).
    runs = {}
    for fused in (False, True):
        trainer = demo_trainer(tmp_path / str(fused), fused_head_loss=fused, loss_chunk_size=16, confidence_beta=2.0,
                               optim="sgd", learning_rate=0.1, max_steps=3, logging_steps=1)
        widths = []
        trainer.model.lm_head.register_forward_hook(lambda module, inputs, out: widths.append(out.shape[-1]))
        trainer.train()
        assert set(widths) == ({0} if fused else {trainer.model.config.vocab_size})
        assert "forward" not in vars(trainer.model.lm_head)  # the head is itself again after each step
        runs[fused] = ([entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                       {name: p.detach() for name, p in trainer.model.named_parameters()})
    assert len(runs[True][0]) == 3
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-6)
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_head_loss_refuses_a_lora_wrapped_head(tmp_path):
    with pytest.raises(ValueError, match="--fused_head_loss needs the model's output head to be a bias-free "
                                         "nn.Linear; it is Linear"):
        demo_trainer(tmp_path, fused_head_loss=True, use_peft=True, lora_target_modules=["lm_head"])
