"""`DiffusionTrainer`: block-diffusion (and masked-diffusion) SFT as a `transformers.Trainer` subclass.

Drop-in for `Trainer` in an existing script (`from dfactory_hf import DiffusionTrainer as Trainer`): plain
`TrainingArguments` are upgraded to `DiffusionTrainingArguments` with the diffusion defaults, raw chat /
prompt-completion / pre-tokenized datasets are turned into documents, and the collator, sampler, loss,
metrics and evaluation are the diffusion ones. Each override below says why it exists.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from functools import partial

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput

from ..data.collators import edit_token_ids
from ..data.keys import EpochKeys, KeyedDataset
from ..data.preprocessing import DataReport, prepare_dataset, save_report
from ..data.sampler import ReplicaEvalBatchSampler, TokenBudgetBatchSampler, TrainingStream
from ..logs import apply_log_level, keep_tensorboard_in_output_dir
from ..models.llada2_moe import LLaDA2MoePreTrainedModel, load_checkpoint_weights
from ..parallel.expert import apply_expert_parallel, check_expert_parallel
from ..parallel.fsdp import (apply_activation_checkpointing, check_fsdp_engaged, check_fsdp_layout,
                             engage_fsdp_on_cpu, fsdp_requested,
                             take_activation_checkpointing_switch, unpin_cpu_offload)
from ..parallel.loading import RankZeroBroadcastLoader, wants_rank0_loading
from ..parallel.sequence import SequenceShard
from ..parallel.state import ParallelState
from ..parallel.ulysses import apply_sequence_parallel, base_backend
from ..paths import check_pretrained_source, load_pretrained
from .checkpoints import (is_disk_full, mark_complete, model_shapes, newest_complete_checkpoint,
                          resolve_resume_checkpoint, rotate, save_failure_message, unmark, write_model_shapes)
from .components import (build_collator, check_answer_scorer, check_attention_backend, check_generation_eval,
                         check_special_ids_embed, has_given_noise, masking_only, resolve_mask_token_id,
                         token_budget_sampler)
from .config import DiffusionTrainingArguments
from .evaluation import AnswerScorer, evaluate_elbo, evaluate_generation
from .flops import batch_training_flops, peak_bf16_flops
from .forward import DiffusionObjective, StepOutput, output_head
from .forward import diffusion_step as forward_step
from .guards import INTERRUPTED_EXIT_STATUS, SaveOnInterrupt, StepCounter, StopAtExactMatch, no_step_message
from .hub import save_run_files
from .lora import apply_lora, base_model, checkpoint_key, initial_adapter_value
from .metrics import STREAM_METRICS, MetricWindow
from .precision import use_autocast_experts
from .profiling import ProfileSteps, parse_profile_steps
from .router import RouterLoad, RouterStep
from .streams import (check_stream_args, is_stream, prepare_train_stream, resuming_stream, save_stream_state,
                      stream_batches, stream_dataloader)


class DiffusionTrainer(Trainer):
    # The loss is normalised by the supervised-token count of the whole optimizer step (all gradient
    # accumulation micro-batches, all ranks): Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, answer_scorer: AnswerScorer | None = None, *,
                 base_model_name: str | None = None, data_sources: list[str] | None = None, **kwargs):
        """answer_scorer: (generated text, reference answer) -> bool, for generation-based evaluation.
        base_model_name / data_sources: what the saved model cards name as the start and the data of the run
        (default: the model's `name_or_path`; none)."""
        if args is None:
            args = DiffusionTrainingArguments(output_dir="outputs/dfactory_hf")
        args = DiffusionTrainingArguments.from_training_arguments(args)
        apply_log_level(args)  # our loggers too, and before the data work (Trainer sets transformers' later)
        if isinstance(model, str):
            model_path = model
            check_pretrained_source("model", model_path, "model")
            model = load_pretrained("model", model_path, AutoModelForCausalLM.from_pretrained, dtype="auto")
            if processing_class is None:
                processing_class = load_pretrained("model", model_path, AutoTokenizer.from_pretrained)
        if model is None:
            raise ValueError("DiffusionTrainer needs a model (a PreTrainedModel or a checkpoint path).")
        if processing_class is None:
            raise ValueError("DiffusionTrainer needs processing_class=<tokenizer> (mask, EOS and pad tokens).")
        tokenizer = processing_class
        self.base_model_description = base_model_name or getattr(getattr(model, "config", None), "_name_or_path", "")
        self.data_sources = list(data_sources or [])
        # Generation-based evaluation scores each answer with this (text, reference) -> bool callable.
        self.answer_scorer = check_answer_scorer(answer_scorer, args)
        self.mask_token_id = resolve_mask_token_id(args, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._model_vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        check_special_ids_embed(self._model_vocab_size, mask=self.mask_token_id, pad=self.pad_token_id,
                                 eos=tokenizer.eos_token_id)
        check_attention_backend(model, args, training=train_dataset is not None)
        if args.bf16:
            use_autocast_experts(model)  # routed experts in bf16 under autocast too (precision.py)
        # One ParallelState for the run, before any data work: every rank, size and reduction goes through it.
        self.parallel_state = ParallelState.from_args(
            args, world_size=args.world_size, num_experts=getattr(getattr(model, "config", None), "num_experts", None),
            device_type=args.device.type)
        if fsdp_requested(args):
            check_fsdp_layout(model, args, self.parallel_state.sizes)
        if self.parallel_state.ep_size > 1:
            if not fsdp_requested(args):
                raise ValueError(f"--ep_size ({args.ep_size}) shards the experts inside FSDP2: launch with an FSDP2 "
                                 "config (configs/accelerate/cpu_fsdp2.yaml on CPU, fsdp2.yaml on GPUs).")
            check_expert_parallel(model, ep_size=args.ep_size, efsdp_size=self.parallel_state.sizes.efsdp,
                                  reduce_dtype=torch.float32 if args.bf16 else model.dtype)
        # Ulysses: the model's attention becomes the sequence-parallel variant of its backend; each batch is then
        # sliced over the sp ranks with the full-length mask (forward.py).
        if self.parallel_state.sp_size > 1:
            apply_sequence_parallel(model, self.parallel_state.sp_size)
        self.sequence_shard = SequenceShard.from_parallel_state(
            self.parallel_state, num_segments=2 if args.block_diffusion_mode else 1)

        self.data_reports: list[DataReport] = []
        self._stream_report, self._stream_given_noise, self._stream_resume = None, False, None  # streams.py
        train_dataset = self._prepare(train_dataset, tokenizer, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: self._prepare(ds, tokenizer, args, f"eval/{name}") for name, ds in eval_dataset.items()}
        else:
            eval_dataset = self._prepare(eval_dataset, tokenizer, args, "eval")
        check_generation_eval(args, eval_dataset)
        if args.complementary_masking and (self._stream_given_noise if is_stream(train_dataset)
                                          else has_given_noise(train_dataset)):
            raise ValueError("complementary_masking=True cannot apply to a dataset that brings its own "
                             "noisy_input_ids; set complementary_masking=False.")

        edits = dict(edit_token_ids=edit_token_ids(tokenizer, vocab_size=model.config.vocab_size)
                     if args.edit_noise_rate > 0 else None)
        if data_collator is None:
            data_collator = build_collator(args, mask_token_id=self.mask_token_id, pad_token_id=self.pad_token_id,
                                           **edits)
        self._eval_collator = build_collator(args, mask_token_id=self.mask_token_id, pad_token_id=self.pad_token_id,
                                             seed=args.seed + 1, **edits)
        if args.use_peft or peft_config is not None:
            model = apply_lora(model, args, peft_config)
        if args.fused_head_loss:
            output_head(model)  # refused here, before any work, unless the head is a plain bias-free nn.Linear
        # Before any wrapping: what a checkpoint of this run records, and a resume compares against.
        self._model_shapes = model_shapes(model)

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.objective = DiffusionObjective.from_args(self.args)
        self._train_window = MetricWindow(streams=self.objective.edit_streams)
        self._eval_window: MetricWindow | None = None
        self._train_batch_sampler: TokenBudgetBatchSampler | None = None
        self._train_stream: TrainingStream | None = None
        self._stream_batches = None  # a streaming train dataset's micro-batches (data/streaming.py)
        self._epoch_keys: EpochKeys | None = None
        self.add_callback(_EpochStart(self))
        self._step_supervised: dict[int, tuple] = {}  # id(labels) -> (labels, (selector, targets)), this step's
        self._eval_batch_sampler: ReplicaEvalBatchSampler | None = None
        self._eval_batch_index = 0
        self.router_load = RouterLoad(self.accelerator.unwrap_model(self.model),
                                      rate=self.args.router_bias_update_rate, reduce_sum=self._reduce_sum)
        self.add_callback(RouterStep(self.router_load))
        keep_tensorboard_in_output_dir(self)  # --report_to tensorboard under output_dir, evaluate() first or not
        self._step_counter = StepCounter()
        self.add_callback(self._step_counter)
        self._interrupt = None
        if self.args.save_on_interrupt:
            self._interrupt = SaveOnInterrupt(
                any_rank=lambda flag: bool(self._reduce_sum(torch.tensor(float(flag))).item() > 0))
            self.add_callback(self._interrupt)
        if self.args.stop_at_exact_match > 0:
            self.add_callback(StopAtExactMatch(self.args.stop_at_exact_match))
        if self.args.profile_steps:
            self.add_callback(ProfileSteps(*parse_profile_steps(self.args.profile_steps)))

    # --- parallelism ------------------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self):
        # FSDP2 must engage on CPU as on GPU (accelerate alone falls back to DDP there), and a fallback must fail.
        engage_fsdp_on_cpu(self.args)
        checkpointing = take_activation_checkpointing_switch(self.args)
        super().create_accelerator_and_postprocess()
        check_fsdp_engaged(self.accelerator, self.args)
        apply_activation_checkpointing(self.accelerator, checkpointing)
        unpin_cpu_offload(self.accelerator)

    def _build_accelerator_args(self, **kwargs):
        # Hand accelerate our mesh, so FSDP2 shards over its named axes and there is one mesh, not two.
        args = super()._build_accelerator_args(**kwargs)
        if fsdp_requested(self.args) and self.parallel_state.mesh is not None:
            args["parallelism_config"] = self.parallel_state.accelerate_parallelism_config()
        return args

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # Rank-0 loading (fsdp_cpu_ram_efficient_loading) fills the shards right after FSDP2 wraps the model and
        # before a resumed checkpoint is read, so Trainer's own resume step is replayed here after it.
        # Expert parallel shards the experts just before accelerate's FSDP2 wraps the rest (parallel/expert.py);
        # with rank-0 loading, after the loader captured rank 0's full tensors.
        if not wants_rank0_loading(self.accelerator):
            self._apply_expert_parallel()
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self.create_optimizer()  # before sharding, as Trainer does under FSDP2; the loader records its groups
        # Expert parallel with a model on meta everywhere (from_pretrained_on_rank0): every rank reads its own pieces.
        reads_own = self.parallel_state.ep_size > 1 and all(p.is_meta for p in self.model.parameters())
        loader = RankZeroBroadcastLoader(
            self.model, self.accelerator, self.optimizer,
            checkpoint=self.model.config._name_or_path if reads_own else None,
            key_of=checkpoint_key, initial_value=partial(initial_adapter_value, seed=self.args.seed))
        self._shard_reader = loader.reader
        if self._apply_expert_parallel():
            loader.rebind_optimizer(self.model, self.optimizer)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        loader.load_into(model, self.optimizer)
        if resume_from_checkpoint is not None:
            self._load_from_checkpoint(resume_from_checkpoint, self.model_wrapped)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _apply_expert_parallel(self) -> bool:
        """Shard the experts (once); True when parameters were replaced."""
        if self.parallel_state.ep_size == 1 or getattr(self, "_expert_modules", None) is not None:
            return False
        plugin = self.accelerator.state.fsdp_plugin
        self._expert_modules = apply_expert_parallel(base_model(self.model), self.parallel_state,
                                                     mp_policy=plugin.mixed_precision_policy,
                                                     offload_policy=plugin.cpu_offload)
        return True

    def _shard_over_data_replicas(self, dataloader):
        # The padded path's batches are dealt out by accelerate's BatchSamplerShard over every process; they belong
        # to data replicas (sp ranks of one replica share a batch). Token-budget samplers shard themselves.
        from accelerate.data_loader import BatchSamplerShard

        shard = getattr(dataloader, "batch_sampler", None)
        if isinstance(shard, BatchSamplerShard) and shard.num_processes > 1:
            shard.num_processes, shard.process_index = self.parallel_state.dp_size, self.parallel_state.dp_rank
        return dataloader

    def get_train_dataloader(self):
        # Batch items carry their epoch (data/keys.py): the dataset copies each key's epoch (and planned row) into its
        # feature, so the collator never changes and persistent workers see every epoch's noise.
        if self.train_dataset is None:
            return super().get_train_dataloader()  # Trainer's own error
        if is_stream(self.train_dataset):  # micro-batched from a look-ahead buffer, its position resumable
            self._stream_batches = stream_batches(self)
            if self._stream_resume is not None:
                self._stream_batches.load_state_dict(self._stream_resume)
            return stream_dataloader(self._stream_batches, self.data_collator)
        dataloader = self._get_dataloader(dataset=KeyedDataset(self.train_dataset), description="Training",
                                          batch_size=self._train_batch_size, sampler_fn=self._get_train_sampler,
                                          is_training=True)
        self._epoch_keys = None
        if self._train_batch_sampler is None:
            # The padded path: accelerate has replaced Trainer's sampler by its seedable one; key its indices in place.
            batch_sampler = dataloader.batch_sampler
            while not hasattr(batch_sampler, "sampler"):  # accelerate's BatchSamplerShard, when sharding
                batch_sampler = batch_sampler.batch_sampler
            batch_sampler.sampler = self._epoch_keys = EpochKeys(batch_sampler.sampler)
        return self._shard_over_data_replicas(dataloader)

    # --- data -------------------------------------------------------------------------------------------------

    def _prepare(self, dataset, tokenizer, args, split: str):
        if dataset is None:
            return None
        if is_stream(dataset):
            check_stream_args(args, split)
            dataset, self._stream_report, self._stream_given_noise = prepare_train_stream(self, dataset, tokenizer,
                                                                                          args)
            self.data_reports.append(self._stream_report)  # filled as training reads the stream
            return dataset
        dataset, report = prepare_dataset(
            dataset, tokenizer, block_size=args.block_size, max_seq_len=args.max_seq_len,
            mask_token_id=self.mask_token_id, overlong_policy=args.overlong_document_policy,
            num_proc=args.dataset_num_proc, split=split, model_vocab_size=self._model_vocab_size,
            supervise_turns=args.supervise_turns,
        )
        self.data_reports.append(report)
        if (report.skipped or report.num_truncated) and args.process_index == 0:  # once per run, not per rank
            print(report.summary())
        return dataset

    def _get_train_sampler(self, train_dataset=None):
        # Packing / token budgets: variable-size micro-batches through Trainer's BatchRebalanceSampler path.
        if not self.args.uses_token_budget:
            return super()._get_train_sampler(getattr(train_dataset, "dataset", train_dataset))
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        dataset = getattr(dataset, "dataset", dataset)  # the documents behind a KeyedDataset
        self._train_batch_sampler = token_budget_sampler(self.args, dataset, self.parallel_state)
        # Trainer's arithmetic needs epochs of one length: the sampler's epochs end to end, in equal pieces.
        self._train_stream = TrainingStream(self._train_batch_sampler)
        return self._train_stream

    def _get_eval_sampler(self, eval_dataset):
        # Several data replicas: each evaluates its own share, no document twice (see ReplicaEvalBatchSampler).
        if self.parallel_state.dp_size == 1 or eval_dataset is None:
            self._eval_batch_sampler = None
            return super()._get_eval_sampler(eval_dataset)
        self._eval_batch_sampler = ReplicaEvalBatchSampler(
            num_items=len(eval_dataset), batch_size=self.args.per_device_eval_batch_size,
            data_parallel_rank=self.parallel_state.dp_rank, data_parallel_size=self.parallel_state.dp_size)
        return self._eval_batch_sampler

    def get_eval_dataloader(self, eval_dataset=None, *, mask_rate: float | None = None):
        """Held-out batches. Their noise is pinned (an evaluation collator of its own, epoch 0), so held-out
        losses compare across evaluations. With `mask_rate`, the batches of that rate of the ELBO grid
        (evaluation.py): masking only, every document once in each data replica's `ReplicaEvalBatchSampler` share,
        the same number of batches on every rank (fillers past its `num_real_batches`)."""
        collator = self._eval_collator if mask_rate is None else masking_only(self._eval_collator, mask_rate)
        train_collator, self.data_collator = self.data_collator, collator
        try:
            if mask_rate is None:
                return self._shard_over_data_replicas(super().get_eval_dataloader(eval_dataset))
            dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else (
                eval_dataset if eval_dataset is not None else self.eval_dataset)
            sampler = ReplicaEvalBatchSampler(
                num_items=len(dataset), batch_size=self.args.per_device_eval_batch_size,
                data_parallel_rank=self.parallel_state.dp_rank, data_parallel_size=self.parallel_state.dp_size)
            # Not through _get_eval_sampler: the main loop's sampler (which prediction_step counts with) stays, and
            # the grid never drops a last short batch (dataloader_drop_last) nor reuses a cached loader.
            return self._get_dataloader(dataset, description="Evaluation",
                                        batch_size=self.args.per_device_eval_batch_size, sampler_fn=lambda _: sampler)
        finally:
            self.data_collator = train_collator

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Trainer resumes with a plain load_state_dict of the saved file; our checkpoints are in the hub's
        # per-expert layout, which that would silently drop. Convert them (plain, unsharded models only).
        model = model if model is not None else self.model
        if self._loads_hub_layout(model):
            load_checkpoint_weights(model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        # Same reason as _load_from_checkpoint.
        if self._loads_hub_layout(self.model):
            load_checkpoint_weights(self.model, self.state.best_model_checkpoint)
            return
        super()._load_best_model()

    def _save_checkpoint(self, model, trial):
        # A checkpoint counts once every rank has written it (see checkpoints.py); older ones are rotated out only
        # after that, so a kill during a save never costs the previous complete checkpoint.
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            unmark(checkpoint_dir)  # a directory being rewritten (a rerun into the same output_dir) stops counting
        self.parallel_state.barrier()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
            if self._stream_batches is not None:  # every process: its replica's position in the stream
                save_stream_state(checkpoint_dir, self._stream_batches, self.args.process_index)
            if self.args.should_save:
                write_model_shapes(checkpoint_dir, self._model_shapes)
        except Exception as error:
            if not is_disk_full(error, checkpoint_dir):
                raise
            # The partial directory is unmarked (ignored by resume); removing it gives the space back.
            if self.args.should_save:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise OSError(errno.ENOSPC, save_failure_message(checkpoint_dir, newest_complete_checkpoint(run_dir))
                          ) from error
        finally:
            self.args.save_total_limit = limit
        self.parallel_state.barrier()
        if self.args.should_save:
            if self.is_fsdp_enabled:  # sharded checkpoints do not go through _save
                save_run_files(self, checkpoint_dir)
            mark_complete(checkpoint_dir, global_step=self.state.global_step, layout=self._checkpoint_layout())
            rotate(run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint)
        self.parallel_state.barrier()

    def _checkpoint_layout(self) -> dict:
        return {**self.parallel_state.describe(), "fsdp": self.is_fsdp_enabled}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # The final save is always the full hub-layout checkpoint that from_pretrained loads in one process, also
        # when training checkpoints are sharded (DCP): gathered parameter by parameter onto rank 0's CPU.
        if not (self.is_fsdp_enabled and not _internal_call):
            return super().save_model(output_dir, _internal_call)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Under LoRA only the adapters are saved: gather the trainable tensors, not the frozen base model.
        state_dict = get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=base_model(self.model) is not self.model))
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)
        self.parallel_state.barrier()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Every saved model folder (final save, checkpoints, the one push_to_hub uploads) also gets the run's
        # block-diffusion decoding defaults and a model card naming base model, data and recipe (hub.py).
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            save_run_files(self, output_dir if output_dir is not None else self.args.output_dir)

    def create_model_card(self, **kwargs) -> None:
        # Trainer's card knows neither the diffusion recipe nor our data sources; push_to_hub calls this.
        if self.is_world_process_zero():
            save_run_files(self, self.args.output_dir, **kwargs)

    def _loads_hub_layout(self, model) -> bool:
        return (isinstance(model, LLaDA2MoePreTrainedModel) and not self.is_fsdp_enabled
                and not self.is_deepspeed_enabled)

    # --- loss -------------------------------------------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples, device):
        # Trainer counts labels != -100 assuming shifted labels; ours are unshifted (or shifted by us) and the
        # loss is normalised by exactly the positions it supervises, summed over the step and all ranks.
        if not batch_samples:
            return None
        # Each micro-batch's supervised positions, once: counted here, and taken up by its loss and FLOPs.
        self._step_supervised = {id(batch["labels"]): (batch["labels"], self.objective.supervised(batch))
                                 for batch in batch_samples}
        count = sum(int(selector.sum()) for _, (selector, _) in self._step_supervised.values())
        count = torch.tensor(count, device=device)
        if self.args.average_tokens_across_devices:
            count = self.parallel_state.sum_over_data(count)  # one count per data replica
        return count

    def floating_point_ops(self, inputs) -> float:
        # Trainer's default counts 6 x every parameter x the L input ids: ours counts the 2L positions the model
        # runs, the active experts only, the allowed attention pairs and the supervised logits (flops.py), for
        # this rank (the sp ranks of a replica share its step). Logged as total_flos, tflops_per_device and mfu.
        config = self.accelerator.unwrap_model(self.model).config
        flops = batch_training_flops(config, inputs, block_size=self.args.block_size,
                                     block_diffusion=self.args.block_diffusion_mode,
                                     num_logits=int(self._supervised(inputs)[0].sum()))
        flops /= self.parallel_state.sp_size
        self._train_window.add_flops(flops)
        return flops

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The diffusion objective: [x_t ; x_0] through the model with the block-diffusion mask, cross-entropy
        # at the supervised x_t positions only.
        with self.router_load.counting() if model.training else contextlib.nullcontext():
            step = self.diffusion_step(model, inputs, num_items=num_items_in_batch,
                                       supervised=self._supervised(inputs))
        loss = step.loss.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # DDP/FSDP average gradients over every rank; the loss is already a global token mean (of this rank's
            # positions under sequence parallel: the sp ranks' losses add up to the replica's).
            loss = loss * self.parallel_state.gradient_average_size
        window = self._train_window if model.training else self._eval_window
        if window is not None:
            window.add(step)
        return (loss, step) if return_outputs else loss

    def diffusion_step(self, model, batch: dict[str, torch.Tensor], *, num_items: torch.Tensor | int | None = None,
                       supervised: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepOutput:
        """Forward and loss of one collated batch (on the device) with this run's objective, attention backend,
        mask dtype and sequence-parallel slicing (forward.py): what `compute_loss` and the ELBO grid run.
        `num_items`: the supervised-token count the loss is divided by (None: this batch's own); `supervised`:
        the batch's (selector, targets) when already computed (None: computed here)."""
        return forward_step(model, batch, self.objective, attn_implementation=self._attn_implementation(model),
                            mask_dtype=self._mask_dtype(model), num_items=num_items,
                            sequence_shard=self.sequence_shard, supervised=supervised)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Diffusion batches have no model-side loss or labels to compare; evaluation metrics are accumulated
        # in the eval window instead.
        inputs = self._prepare_inputs(inputs)
        # A batch that only keeps the ranks in step (ReplicaEvalBatchSampler) runs, but is not counted.
        sampler, index = self._eval_batch_sampler, self._eval_batch_index
        self._eval_batch_index += 1
        counted = sampler is None or index < sampler.num_real_batches
        window, self._eval_window = self._eval_window, (self._eval_window if counted else None)
        try:
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
        finally:
            self._eval_window = window
        return loss.detach(), None, None

    # --- evaluation and logging ---------------------------------------------------------------------------------

    def evaluate(self, *args, **kwargs):
        # Under FSDP2 the model is sharded (with its optimizer, as accelerate requires) when train() starts;
        # Trainer's own evaluate-before-train path then fails inside accelerate with an unrelated message.
        if self.is_fsdp_enabled and not self.accelerator._models:
            raise ValueError("Under FSDP2, evaluate() works once train() has sharded the model: call it after "
                             "train() (or set eval_strategy to evaluate during training).")
        return super().evaluate(*args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval") -> EvalLoopOutput:
        self._eval_window, self._eval_batch_index = MetricWindow(streams=self.objective.edit_streams), 0
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            summary = self._eval_window.summary(self._reduce_sum, device=self.args.device)
        finally:
            self._eval_window = None
        metrics = output.metrics
        # Token-weighted held-out loss (Trainer's own is a mean of per-batch means); with no supervised token (given
        # noise that masks nothing) there is no loss to report, not a perfect 0.
        scored = summary["supervised_tokens"] > 0
        metrics[f"{metric_key_prefix}_loss"] = summary["ce_loss"] if scored else float("nan")
        metrics[f"{metric_key_prefix}_masked_token_accuracy"] = (summary["masked_token_accuracy"] if scored
                                                                 else float("nan"))
        metrics[f"{metric_key_prefix}_supervised_tokens"] = summary["supervised_tokens"]
        for key in STREAM_METRICS:
            if key in summary:
                metrics[f"{metric_key_prefix}_{key}"] = summary[key]
        if self.args.eval_mask_rates:
            metrics.update(evaluate_elbo(self, dataloader.dataset, prefix=metric_key_prefix))
        if self.args.eval_generation_samples > 0:
            metrics.update(evaluate_generation(self, dataloader.dataset, prefix=metric_key_prefix))
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Add the diffusion metrics of the steps since the last log; every rank reaches this together.
        if "loss" in logs and self._train_window.num_steps > 0:
            summary = self._train_window.summary(self._reduce_sum, device=self.args.device,
                                                 num_devices=self.args.world_size,
                                                 peak_flops=peak_bf16_flops(self.args.device))
            logs.update({key: round(value, 6) for key, value in summary.items()})
            logs.update(self.router_load.summary())
            self._train_window.reset()
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # Resume only from complete checkpoints, `last` meaning the newest one; refused before any work otherwise.
        for report in self.data_reports:
            if report.split == "train" and report.supervises_nothing:
                raise ValueError(f"Nothing in the train dataset is supervised: every document brings noisy_input_ids "
                                 "with no masked response position, so training would run at loss 0 and learn "
                                 "nothing. Mask some response tokens (noisy_input_ids = the mask token id, labels = "
                                 f"the clean token), or drop the noise columns to have it drawn.\n{report.summary()}")
        if (not self.args.uses_token_budget and self.args.dataloader_drop_last and self.train_dataset is not None
                and len(self.train_dataset) < self.args.per_device_train_batch_size * self.parallel_state.dp_size):
            raise ValueError(no_step_message(self))  # Trainer would fail on the empty dataloader with its own words
        resume_from_checkpoint = resolve_resume_checkpoint(
            resume_from_checkpoint, output_dir=self.args.output_dir, layout=self._checkpoint_layout(),
            shapes=self._model_shapes)
        with resuming_stream(self, resume_from_checkpoint):  # a stream restores its own position (streams.py)
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.state.global_step == 0:
            # Trainer returns normally from a run that trained nothing; the caller would save an untrained model.
            raise ValueError(no_step_message(self))
        # Data problems were skipped and counted; report them at the end, where the user looks.
        if self.data_reports and self.is_world_process_zero():
            for report in self.data_reports:
                if report.skipped or report.num_truncated:
                    print(report.summary())
            os.makedirs(self.args.output_dir, exist_ok=True)
            save_report(self.data_reports, os.path.join(self.args.output_dir, "data_report.json"))
        if self.router_load.gates and self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "router_load.json"), "w") as handle:
                json.dump({"tokens_per_expert": self.router_load.tokens_per_expert()}, handle)
        if self._interrupt is not None and self._interrupt.saved_at_step is not None:
            if self.is_world_process_zero():
                print(f"[dfactory_hf] SIGTERM: saved checkpoint-{self._interrupt.saved_at_step} in "
                      f"{self.args.output_dir} and stopped; resume with --resume_from_checkpoint last.", flush=True)
            raise SystemExit(INTERRUPTED_EXIT_STATUS)
        return output

    # --- helpers ----------------------------------------------------------------------------------------------

    def _supervised(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(selector, targets) of a micro-batch of this step (computed in _get_num_items_in_batch), else computed."""
        labels = batch["labels"]
        known = self._step_supervised.get(id(labels))
        if known is not None and known[0] is labels:  # the same tensor (the entry holds it, so its id is not reused)
            return known[1]
        return self.objective.supervised(batch)

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        # Metric sums: per-rank partials (sp ranks split positions); per-replica counts come from sp rank 0 only.
        return self.parallel_state.sum_over_world(tensor.to(self.args.device))

    def _attn_implementation(self, model) -> str:
        """The backend the mask is built for (the Ulysses variant computes with its base backend)."""
        return base_backend(self.accelerator.unwrap_model(model).config._attn_implementation)

    def _mask_dtype(self, model) -> torch.dtype:
        if self.args.bf16:
            return torch.bfloat16
        if self.args.fp16:
            return torch.float16
        return self.accelerator.unwrap_model(model).dtype


class _EpochStart(TrainerCallback):
    """At every epoch start, a resumed one included (where Trainer's set_epoch does not reach a batch sampler behind
    accelerate's skip wrapper): the token-budget stream's piece, or the epoch the padded path's keys carry."""

    def __init__(self, trainer: DiffusionTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer._train_stream is not None:
            stream = self.trainer._train_stream
            stream.set_epoch(state.global_step // stream.steps_per_epoch)  # every piece is steps_per_epoch steps
        if self.trainer._epoch_keys is not None:
            self.trainer._epoch_keys.epoch = int(state.epoch or 0)  # Trainer's epoch: [0, 1) is epoch 0, ...
