"""`CGMLLMTrainer`: `transformers.Trainer` with CG-MLLM's two-term loss, EMA weights and reproducible noise.

Loss. `loss = lm_loss_weight * CE + flow_loss_weight * flow MSE`, defined once in `cgmllm.cgmllm_loss` and computed
by the model's forward: each term is a *sum* over its own items divided by the number of such items in the whole
optimizer step (all gradient-accumulation micro-batches, all processes), which the Trainer counts and passes in:
CE over caption tokens (`labels != -100`), flow over target latent rows (`shape_loss_mask`). Then accumulating
micro-batches, or splitting a batch over devices, gives the same gradient as one big batch. Both terms are logged
(`lm_loss`, `flow_loss`), summed over processes like `loss`, so `lm_loss + flow_loss == loss` (unit weights).

Noise. The flow timesteps and noise come from a generator seeded by `(args.seed, global_step, micro-batch)`,
so resuming from a checkpoint reproduces the uninterrupted run exactly.

Use `TrainingArguments(remove_unused_columns=False, ...)`: the collator already returns model kwargs.
`bf16=True` (GPU) runs the model in bf16 autocast; the flow MSE is computed in float32 either way.
`gradient_checkpointing=True` works (the decoder layers are `GradientCheckpointingLayer`s).
"""

import dataclasses
import logging
import os
import shutil

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpointing import check_resumable, last_complete_checkpoint, publish, staging_path
from .checks import NonFiniteLossError


logger = logging.getLogger(__name__)


EMA_WEIGHTS_NAME = "ema.safetensors"


def load_ema_weights(path) -> dict[str, torch.Tensor]:
    """The EMA weights saved as `ema.safetensors` (a file, or a checkpoint / `final` folder holding one)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    return load_file(os.path.join(path, EMA_WEIGHTS_NAME) if os.path.isdir(path) else path)


class EMACallback(TrainerCallback):
    """Exponential moving average of the trainable weights, saved as `ema.safetensors` in every checkpoint.

    The shadow weights are float32 whatever the model's dtype: at decay 0.9999 a bf16 shadow could not represent the
    per-step change (that, a built-in decay warm-up and a state keyed by parameter order rather than by name are why
    diffusers' `EMAModel` is not used here).

    Where the EMA starts, at `on_train_begin`:
        * resuming (`resume_from` set): the checkpoint's `ema.safetensors`; a checkpoint without one is an error,
          unless `restart_on_missing=True`, which restarts it from the weights with a warning naming the file;
        * else `initial` when given (the EMA of a previous stage: a staged run keeps one EMA throughout);
        * else the model's current weights.
    The checkpoint's copy is written by `CGMLLMTrainer` together with the checkpoint; the final EMA goes to
    `output_dir` at the end of training.
    """

    def __init__(self, decay: float = 0.9999, initial: dict[str, torch.Tensor] | None = None,
                 restart_on_missing: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}.")
        self.decay = decay
        self.initial = initial
        self.restart_on_missing = restart_on_missing
        self.shadow: dict[str, torch.Tensor] | None = None
        self.resume_from: str | None = None

    @staticmethod
    def _params(model):
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def _adopt(self, weights: dict, params: dict, source: str) -> dict[str, torch.Tensor]:
        missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        if missing or unexpected:
            raise ValueError(f"The EMA weights of {source} do not match the trainable weights: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)} in all).")
        return {name: weights[name].detach().float().clone().to(p.device) for name, p in params.items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = self._params(model)
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}
        if self.resume_from:
            path = os.path.join(self.resume_from, EMA_WEIGHTS_NAME)
            if os.path.isfile(path):
                self.shadow = self._adopt(load_ema_weights(path), params, path)
            elif self.restart_on_missing:
                logger.warning("%s is missing: the EMA restarts from the checkpoint's weights (its history is lost).",
                               path)
            else:
                raise ValueError(
                    f"Resuming from {self.resume_from}, which has no EMA weights ({path} is missing: the run that "
                    "saved it had no EMA, or an older version was killed before writing it). Resuming would restart the "
                    "EMA from the current weights and lose its history. Resume from a checkpoint that has the file, or "
                    "restart the EMA explicitly: `CGMLLMTrainer(..., ema_restart_on_missing=True)` (`cgmllm-train`: "
                    "`ema_restart_on_missing: true` in the config)."
                )
        elif self.initial is not None:
            self.shadow = self._adopt(self.initial, params, "the previous stage")

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        for name, param in self._params(model).items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def save(self, directory: str) -> str:
        """Write `ema.safetensors` into `directory` (through a temporary file, so a kill never leaves half a file)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, EMA_WEIGHTS_NAME)
        save_file({name: t.contiguous().cpu() for name, t in self.shadow.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
        return path

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.shadow is not None:
            self.save(args.output_dir)

    def copy_to(self, model) -> None:
        """Load the EMA weights into `model` (e.g. before exporting)."""
        params = self._params(model)
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value.to(params[name].dtype))


class _EpochCallback(TrainerCallback):
    """Tells the collator the epoch, so its per-sample randomness varies by epoch and survives resuming."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))


class CGMLLMTrainer(Trainer):
    """`Trainer` for [`CGMLLMForConditionalGeneration`] (plain, peft-wrapped or DDP-wrapped).

    Args:
        ema_decay: keep an EMA of the trainable weights with this decay (None: no EMA). The paper uses 0.9999.
        ema_initial: the EMA to continue from (name -> tensor), e.g. the previous stage's; None starts it from the
            model's weights. Resuming from a checkpoint takes the checkpoint's EMA instead.
        ema_restart_on_missing: resuming from a checkpoint without `ema.safetensors` restarts the EMA with a warning
            instead of raising.
        All other arguments are those of `transformers.Trainer`.

    Beyond `Trainer`: checkpoints are written to `.incomplete-checkpoint-<step>` and renamed when complete (EMA
    included); `train(resume_from_checkpoint=True)` takes the newest complete checkpoint, naming any incomplete one
    it skips; a non-finite loss raises `NonFiniteLossError` with the step and the batch's sample ids (a
    `CGMLLMDataCollator` is switched to `return_uids=True` for that) before any weight changes.
    """

    def __init__(self, *args, ema_decay: float | None = None, ema_initial: dict | None = None,
                 ema_restart_on_missing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        # Both terms are normalised by global counts here, so the Trainer must not divide by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.ema = None
        if ema_decay is not None:
            self.ema = EMACallback(ema_decay, initial=ema_initial, restart_on_missing=ema_restart_on_missing)
            self.add_callback(self.ema)
        collator = self.data_collator
        if getattr(collator, "return_uids", None) is False and dataclasses.is_dataclass(collator) and \
                not self._batches_are_dispatched():
            self.data_collator = dataclasses.replace(collator, return_uids=True)  # the caller's object is unchanged
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(_EpochCallback(self.data_collator))
        self._staging_run_dir = None
        self._window_counts = None
        self._micro_step = 0
        self._component_sums = {"lm_loss": 0.0, "flow_loss": 0.0}
        self._component_steps = 0
        self._last_counted_step = -1

    def _batches_are_dispatched(self) -> bool:
        """Whether accelerate broadcasts whole batches (tensors only: the string sample ids could not travel)."""
        import datasets

        dispatch = self.args.accelerator_config.dispatch_batches
        if dispatch is None:  # accelerate's default: dispatch iterable data sets
            dispatch = isinstance(self.train_dataset, (torch.utils.data.IterableDataset, datasets.IterableDataset))
        return bool(dispatch) and self.args.world_size > 1

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in {self.args.output_dir}.")
        elif resume_from_checkpoint:
            resume_from_checkpoint = check_resumable(resume_from_checkpoint)
        if self.ema is not None:
            self.ema.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints: written under a temporary name, renamed when complete
    # ------------------------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_path(os.path.join(run_dir, name))
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # leftover of a save that was killed
        self.accelerator.wait_for_everyone()
        # The Trainer writes `<run_dir>/checkpoint-<step>`: point it at the staging folder as its run folder.
        self._staging_run_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        written = os.path.join(staging, name)
        if self.args.should_save and self.ema is not None:
            self.ema.save(written)
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states, shards)
        if self.args.should_save:
            publish(written, os.path.join(run_dir, name))
            shutil.rmtree(staging)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(
                    self.state.best_model_checkpoint))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def save_final(self, directory: str) -> str:
        """Save the model (and processor), the EMA and `trainer_state.json` into `directory`, written under a
        temporary name and renamed when complete: `directory` existing means the training it ends was finished."""
        staged = staging_path(directory)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.save_model(staged)  # every process calls it; the Trainer writes on the main one
        if self.args.should_save:
            if self.ema is not None:
                self.ema.save(staged)
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            publish(staged, directory)
        self.accelerator.wait_for_everyone()
        return directory

    # ------------------------------------------------------------------------------------------------------------
    # Global item counts of one optimizer step
    # ------------------------------------------------------------------------------------------------------------
    def _global_sum(self, value: torch.Tensor, device) -> torch.Tensor:
        value = value.to(device)
        if self.args.world_size > 1 and self.args.average_tokens_across_devices:
            value = self.accelerator.gather(value.reshape(1)).sum()
        return value

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        num_tokens = sum((b["labels"][..., 1:] != -100).sum() for b in batch_samples if "labels" in b)
        num_rows = sum(b["shape_loss_mask"].sum() for b in batch_samples if "shape_loss_mask" in b)
        num_tokens = self._global_sum(torch.as_tensor(num_tokens), device)
        num_rows = self._global_sum(torch.as_tensor(num_rows), device)
        self._window_counts = (num_tokens, num_rows)
        self._micro_step = 0
        return batch_samples, num_tokens

    def _noise_generator(self) -> torch.Generator:
        seed = (self.args.seed * 1_000_003 + self.state.global_step * 1009 + self._micro_step) % (2**63)
        self._micro_step += 1
        return torch.Generator().manual_seed(seed + self.args.process_index * 7919)

    # ------------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model computes the loss (`cgmllm_loss`, one definition); the Trainer only supplies the denominators:
        the optimizer step's global label tokens and target latent rows while training, this batch's otherwise."""
        inputs = dict(inputs)
        sample_uids = inputs.pop("sample_uids", None)
        counts = {}
        scale = 1
        if model.training and self._window_counts is not None:
            counts = dict(zip(("num_items_in_batch", "num_shape_rows_in_batch"), self._window_counts))
            # Each process's loss is its share of the global sum; DDP averages gradients over processes.
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        outputs = model(**inputs, **counts, generator=self._noise_generator() if model.training else None)
        config = self.accelerator.unwrap_model(model).config

        # Every output stays in the graph (DDP) when a term is absent from this process's batch.
        zero = outputs.logits.sum() * 0.0
        if outputs.velocity is not None:
            zero = zero + outputs.velocity.sum() * 0.0
        lm_loss = outputs.lm_loss if outputs.lm_loss is not None else zero
        flow_loss = outputs.flow_loss if outputs.flow_loss is not None else zero
        loss = config.lm_loss_weight * lm_loss + config.flow_loss_weight * flow_loss
        if model.training and not bool(torch.isfinite(loss.detach())):
            raise NonFiniteLossError(
                f"Training step {self.state.global_step + 1}: the loss is {float(loss.detach())} (lm_loss "
                f"{float(lm_loss.detach())}, flow_loss {float(flow_loss.detach())}) on the batch of samples "
                f"{sample_uids if sample_uids is not None else '(ids not available)'}. Training stopped before this "
                "step's update, so the saved checkpoints are unaffected. Check those samples' data; if they are "
                "fine, lower the learning rate or clip gradients (`max_grad_norm`)."
            )

        if model.training:
            self._component_sums["lm_loss"] = self._component_sums["lm_loss"] + lm_loss.detach()
            self._component_sums["flow_loss"] = self._component_sums["flow_loss"] + flow_loss.detach()
            if self.state.global_step != self._last_counted_step:
                self._component_steps += 1
                self._last_counted_step = self.state.global_step
        loss = loss * scale
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        # Called on every process at a logging step (the Trainer gathers `loss` there too). `loss` is the mean over
        # processes of `share * num_processes`; each process's component is its share of the global sum, so the
        # global value is the sum over processes (the mean, when counts are per process).
        if "loss" in logs and self._component_steps > 0:
            totals = torch.stack([torch.as_tensor(self._component_sums[name], dtype=torch.float32,
                                                  device=self.args.device) for name in ("lm_loss", "flow_loss")])
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
                if not self.args.average_tokens_across_devices:
                    totals = totals / self.args.world_size
            for name, total in zip(("lm_loss", "flow_loss"), totals.tolist()):
                logs[name] = round(total / self._component_steps, 6)
            self._component_sums = {"lm_loss": 0.0, "flow_loss": 0.0}
            self._component_steps = 0
        return super().log(logs, *args, **kwargs)

    def create_accelerator_and_postprocess(self):
        # accelerate "dispatches" batches of iterable (streamed) data sets by default: it fetches each batch once and
        # cuts every tensor to the batch size along dim 0. The collator's `shape_latents` / `pixel_values` are rows
        # of all samples flattened (not batch-first), so cutting them truncates the batch. Left unset, it is off.
        if self.args.accelerator_config.dispatch_batches is None:
            self.args.accelerator_config.dispatch_batches = False
        return super().create_accelerator_and_postprocess()


__all__ = ["CGMLLMTrainer", "EMACallback", "EMA_WEIGHTS_NAME", "NonFiniteLossError", "load_ema_weights"]
