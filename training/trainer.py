"""`CGMLLMTrainer`: `transformers.Trainer` with CG-MLLM's two-term loss, EMA weights and reproducible noise.

Loss. `loss = lm_loss_weight * CE + flow_loss_weight * flow MSE`, where each term is a *sum* over its own items
divided by the number of such items in the whole optimizer step (all gradient-accumulation micro-batches, all
processes): CE over caption tokens (`labels != -100`), flow over target latent rows (`shape_loss_mask`). Then
accumulating micro-batches, or splitting a batch over devices, gives the same gradient as one big batch.
Both terms are logged (`lm_loss`, `flow_loss`).

Noise. The flow timesteps and noise come from a generator seeded by `(args.seed, global_step, micro-batch)`,
so resuming from a checkpoint reproduces the uninterrupted run exactly.

Use `TrainingArguments(remove_unused_columns=False, ...)`: the collator already returns model kwargs.
`bf16=True` (GPU) runs the model in bf16 autocast; the flow MSE is computed in float32 either way.
`gradient_checkpointing=True` works (the decoder layers are `GradientCheckpointingLayer`s).
"""

import os

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback


EMA_WEIGHTS_NAME = "ema.safetensors"


class EMACallback(TrainerCallback):
    """Exponential moving average of the trainable weights, saved as `ema.safetensors` in every checkpoint.

    The EMA is restored from the checkpoint a run resumes from, and written to `output_dir` at the end.
    """

    def __init__(self, decay: float = 0.9999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}.")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] | None = None
        self.resume_from: str | None = None

    @staticmethod
    def _params(model):
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.shadow = {name: p.detach().float().clone() for name, p in self._params(model).items()}
        if self.resume_from:
            path = os.path.join(self.resume_from, EMA_WEIGHTS_NAME)
            if os.path.isfile(path):
                from safetensors.torch import load_file

                loaded = load_file(path)
                missing = set(self.shadow) - set(loaded)
                if missing:
                    raise ValueError(f"{path} lacks EMA weights for {sorted(missing)[:5]} ...")
                self.shadow = {name: loaded[name].to(self.shadow[name].device) for name in self.shadow}

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        for name, param in self._params(model).items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def save(self, directory: str) -> str:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, EMA_WEIGHTS_NAME)
        save_file({name: t.contiguous().cpu() for name, t in self.shadow.items()}, path)
        return path

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.shadow is not None:
            self.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

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
        All other arguments are those of `transformers.Trainer`.
    """

    def __init__(self, *args, ema_decay: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Both terms are normalised by global counts here, so the Trainer must not divide by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.ema = None
        if ema_decay is not None:
            self.ema = EMACallback(ema_decay)
            self.add_callback(self.ema)
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(_EpochCallback(self.data_collator))
        self._window_counts = None
        self._micro_step = 0
        self._component_sums = {"lm_loss": 0.0, "flow_loss": 0.0}
        self._component_steps = 0
        self._last_counted_step = -1

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.ema is not None:
            if resume_from_checkpoint is True:
                from transformers.trainer_utils import get_last_checkpoint

                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            self.ema.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

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
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = model(**inputs, generator=self._noise_generator() if model.training else None)
        config = self.accelerator.unwrap_model(model).config
        if model.training and self._window_counts is not None:
            num_tokens, num_rows = self._window_counts
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        else:
            num_tokens = (labels[..., 1:] != -100).sum() if labels is not None else 0
            num_rows = inputs["shape_loss_mask"].sum() if "shape_loss_mask" in inputs else 0
            scale = 1

        zero = outputs.logits.sum() * 0.0  # keeps every output in the graph (DDP) when a term is absent
        lm_loss = zero
        if labels is not None and int(num_tokens) > 0:
            logits = outputs.logits[:, :-1].float()
            lm_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                                     ignore_index=-100, reduction="sum")
            lm_loss = lm_sum / num_tokens
        flow_loss = zero
        if outputs.velocity is not None:
            flow_loss = flow_loss + outputs.velocity.sum() * 0.0
            if outputs.flow_loss_mask is not None and int(num_rows) > 0:
                per_row = (outputs.velocity.float() - outputs.velocity_target.float()).pow(2).mean(-1)
                flow_loss = flow_loss + per_row[outputs.flow_loss_mask].sum() / num_rows
        loss = config.lm_loss_weight * lm_loss + config.flow_loss_weight * flow_loss

        if model.training:
            self._component_sums["lm_loss"] = self._component_sums["lm_loss"] + lm_loss.detach()
            self._component_sums["flow_loss"] = self._component_sums["flow_loss"] + flow_loss.detach()
            if self.state.global_step != self._last_counted_step:
                self._component_steps += 1
                self._last_counted_step = self.state.global_step
        loss = loss * scale
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._component_steps > 0:
            for name, total in self._component_sums.items():
                logs[name] = round(float(total) / self._component_steps, 6)
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


__all__ = ["CGMLLMTrainer", "EMACallback", "EMA_WEIGHTS_NAME"]
