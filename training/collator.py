"""Training batches: the four CG-MLLM tasks built with the processor's prompt formats, condition dropout, packing.

Tasks (see `cgmllm.processing_cgmllm` for the exact layouts):
    text_to_shape   text prompt -> noisy 3D block (flow loss); dropout replaces the prompt with the empty context;
                    the prompt is one of the `captions` paraphrases when the data set has that column
    image_to_shape  image -> noisy 3D block (flow loss); dropout replaces the image with the empty context
    shape_caption   clean 3D block (t = 0) + question -> caption (CE on the caption and its `<|im_end|>`)
    image_caption   question + image -> caption (CE)

Randomness (task choice, dropout, paraphrase) is drawn from a generator seeded by `(seed, epoch, uid)`, never from the global RNG,
so a run resumed from a checkpoint sees the same batches as an uninterrupted one (`CGMLLMTrainer` calls
`set_epoch`).
"""

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import check_finite_samples


TASKS = ("text_to_shape", "image_to_shape", "shape_caption", "image_caption")
GENERATION_TASKS = ("text_to_shape", "image_to_shape")
IMAGE_TASKS = ("image_to_shape", "image_caption")
"""Tasks that need a view of the object (`image`, or one of `images`); an example without one does the others only."""
CAPTION_TASKS = ("text_to_shape", "shape_caption", "image_caption")
"""Tasks that need the example's `caption`; an example without one (t500k rows without captions) does image -> 3D."""


def caption_paraphrases(example) -> list[str]:
    """The usable paraphrases of `example` (its `captions` column, empty if it has none): a text -> 3D prompt is drawn
    from them, or is the canonical `caption` where there are none."""
    return [text for text in (example.get("captions") or ()) if isinstance(text, str) and text.strip()]


@dataclass
class CGMLLMDataCollator:
    """Turns examples (`uid`, `caption`, latents, optional `image`) into `CGMLLMForConditionalGeneration` kwargs.

    Args:
        processor: a [`CGMLLMProcessor`].
        num_shape_tokens: latent rows per 3D block in this stage. Latents come from the column `latents_{N}` or
            `latents` (which must then have N rows), or are encoded on the fly from `mesh`/`points` with `vae`.
        task_weights: relative frequency of each task; tasks an example cannot do (no image) are left out for it.
        condition_dropout: probability of dropping the condition of a generation task (needed for CFG).
        max_tokens: token budget of a packed row; None puts one sample per (right-padded) row, unpacked.
        seed: base seed of the per-sample randomness.
        vae: optional frozen ShapeVAE for on-the-fly encoding.
        point_encoder: a frozen [`PointBERTEncoder`] for examples with a `point_cloud` (PointLLM's caption set, xyz +
            rgb, already normalised by the loader). Such an example does 3D captioning only, asked its own `question`,
            and its block holds the encoder's `1 + num_group` feature rows: the batch carries `point_features` for the
            model's `obj_und_connector` instead of `shape_latents` (one kind per batch: the model takes one).
        return_uids: add `sample_uids` (the batch's sample ids, in order) to the batch. `CGMLLMTrainer` turns it on
            to name the samples of a batch whose loss is not finite, and removes the key before the forward.
        shape_block_size: the model's `config.shape_block_size`. When it is smaller than `num_shape_tokens`, the
            generation tasks lay their object out block-wise (`CGMLLMProcessor.blockwise_shape_layout`: a noisy and a
            clean copy of every block, block-causal), the layout the pipeline then samples block by block, and the
            batch carries `shape_block_ids`. None (or N) keeps one block per object (the released model).

    Latents that are not finite (read from the cache or encoded here) raise a `ValueError` naming the sample.
    """

    processor: object
    num_shape_tokens: int
    task_weights: dict = field(default_factory=lambda: {"text_to_shape": 1.0, "shape_caption": 1.0})
    condition_dropout: float = 0.1
    max_tokens: int | None = None
    seed: int = 0
    vae: object = None
    num_surface_points: int | None = None
    epoch: int = 0
    return_uids: bool = False
    point_encoder: object = None
    shape_block_size: int | None = None

    def __post_init__(self):
        unknown = set(self.task_weights) - set(TASKS)
        if unknown:
            raise ValueError(f"Unknown tasks {sorted(unknown)}; expected some of {TASKS}.")
        if not any(w > 0 for w in self.task_weights.values()):
            raise ValueError(f"At least one task needs a positive weight, got {self.task_weights}.")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {self.condition_dropout}.")
        block = self.shape_block_size
        if block is not None and (block <= 0 or self.num_shape_tokens % block):
            raise ValueError(
                f"shape_block_size={block} (the model's config) must be a positive divisor of this stage's "
                f"num_shape_tokens={self.num_shape_tokens}."
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ------------------------------------------------------------------------------------------------------------
    def _rng(self, example) -> random.Random:
        key = f"{self.seed}/{self.epoch}/{example.get('uid', example.get('caption'))}"
        return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))

    def _latents(self, example) -> torch.Tensor:
        n = self.num_shape_tokens
        for column in (f"latents_{n}", "latents"):
            if example.get(column) is not None:
                latents = torch.as_tensor(np.asarray(example[column], dtype=np.float32))
                if latents.ndim != 2 or latents.shape[0] != n:
                    raise ValueError(
                        f"Sample {example.get('uid')!r}: column {column!r} holds latents of shape "
                        f"{tuple(latents.shape)}, but this stage uses {n} shape tokens. Encode the data at N={n}."
                    )
                check_finite_samples(latents[None], [example.get("uid")], f"The cached latents ({column!r})")
                return latents
        if self.vae is not None and any(example.get(name) is not None
                                        for name in ("mesh", "points", "surface", "surface_file")):
            from .data import example_surface
            from .preprocess import encode_latents

            surface = example_surface(example, self.vae.config, seed=self.seed,
                                      num_points=self.num_surface_points)[None]
            check_finite_samples(surface, [example.get("uid")], "The surface points")
            latents = encode_latents(self.vae, surface, n, seed=self.seed)
            check_finite_samples(latents, [example.get("uid")], f"The ShapeVAE latents (N={n})")
            return latents[0]
        raise ValueError(
            f"Sample {example.get('uid')!r} has no `latents_{n}` / `latents` column and no VAE was given to encode "
            "its shape on the fly."
        )

    def _choose_task(self, example, rng) -> str:
        has_image = example.get("image") is not None or bool(example.get("images"))
        caption = example.get("caption")
        has_caption = isinstance(caption, str) and bool(caption.strip())
        tasks = [t for t, w in self.task_weights.items() if w > 0 and (has_image or t not in IMAGE_TASKS)
                 and (has_caption or t not in CAPTION_TASKS)]
        if example.get("point_cloud") is not None:  # a PointBERT cloud is captioned, never generated
            tasks = [t for t in tasks if t == "shape_caption"]
        if not tasks:
            lacks = " and no ".join(what for what, present in (("image", has_image), ("caption", has_caption))
                                    if not present)
            raise ValueError(f"Sample {example.get('uid')!r} fits none of the tasks {sorted(self.task_weights)}: it "
                             f"has no {lacks}.")
        return rng.choices(tasks, weights=[self.task_weights[t] for t in tasks])[0]

    def _point_features(self, example) -> torch.Tensor:
        """`(1 + num_group, trans_dim)` PointBERT features of the example's `point_cloud`."""
        if self.point_encoder is None:
            raise ValueError(
                f"Sample {example.get('uid')!r} is a PointBERT cloud (`point_cloud`: PointLLM's caption set, xyz + "
                "rgb), not a shape the ShapeVAE encodes: pass `point_encoder=` (a frozen `cgmllm.PointBERTEncoder`)."
            )
        encoder = self.point_encoder
        cloud = torch.as_tensor(np.asarray(example["point_cloud"], dtype=np.float32))[None]
        with torch.no_grad():
            features = encoder(cloud.to(encoder.device)).float().cpu()
        check_finite_samples(features, [example.get("uid")], "The PointBERT features")
        return features[0]

    @staticmethod
    def _image(example, rng):
        """The example's view: `image`, or one of `images` drawn per sample and epoch (the t500k `image_list`)."""
        if example.get("image") is not None:
            return example["image"]
        return rng.choice(list(example["images"]))

    def build_sample(self, example) -> dict:
        """One example -> `input_ids`, `labels` (lists), `latents`, `loss_mask`, `pixel_values`, `image_grid_thw`."""
        processor = self.processor
        rng = self._rng(example)
        task = self._choose_task(example, rng)
        caption = example.get("caption")
        drop = task in GENERATION_TASKS and rng.random() < self.condition_dropout
        images, target = None, None
        if task == "text_to_shape":
            # Prompts are drawn from the paraphrases (when the data set has them), so generation follows any
            # wording; caption targets stay the canonical `caption`, so the captioner answers in one style.
            paraphrases = caption_paraphrases(example)
            prompt_text = rng.choice(paraphrases) if paraphrases else caption
            prompt = processor.text_to_shape_prompt("" if drop else prompt_text) + "<shape>"
        elif task == "image_to_shape":
            prompt = ("" if drop else processor.image_to_shape_prompt()) + "<shape>"
            images = None if drop else [self._image(example, rng)]
        elif task == "shape_caption":
            question = example.get("question")  # PointLLM asks each object its own question
            prompt = processor.shape_caption_prompt(question) if question else processor.shape_caption_prompt()
            target = processor.caption_target(caption)
        else:
            prompt, target = processor.image_caption_prompt(), processor.caption_target(caption)
            images = [self._image(example, rng)]
        has_shape = "<shape>" in prompt
        point_features = None
        if has_shape and example.get("point_cloud") is not None:
            point_features = self._point_features(example)
        num_rows = self.num_shape_tokens if point_features is None else point_features.shape[0]
        blockwise = (task in GENERATION_TASKS and self.shape_block_size is not None
                     and self.shape_block_size < self.num_shape_tokens)
        if blockwise:  # the generated object closes the prompt: its block-wise layout replaces `<shape>`
            prompt = prompt[: -len("<shape>")]
        encoded = processor(text=prompt, images=images, num_shape_tokens=num_rows, padding=False)
        input_ids = encoded["input_ids"][0].tolist()
        labels = [-100] * len(input_ids)
        if target is not None:
            target_ids = processor.tokenizer(target, add_special_tokens=False)["input_ids"]
            input_ids, labels = input_ids + target_ids, labels + target_ids
        latents = self._latents(example) if has_shape and point_features is None else None
        loss_mask, block_ids = task in GENERATION_TASKS, None
        if blockwise:
            layout = processor.blockwise_shape_layout(self.num_shape_tokens, self.shape_block_size)
            block_ids = [-1] * len(input_ids) + layout["shape_block_ids"]
            input_ids = input_ids + layout["input_ids"]
            labels = labels + [-100] * len(layout["input_ids"])
            latents = latents[torch.tensor(layout["latent_index"])]  # noisy and clean copies of every block
            loss_mask = torch.tensor(layout["shape_loss_mask"])  # flow loss on the noisy copies only
        return {
            "uid": example.get("uid"),
            "input_ids": input_ids,
            "labels": labels,
            "latents": latents,
            "point_features": point_features,
            "loss_mask": loss_mask,
            "shape_block_ids": block_ids,
            "pixel_values": encoded.get("pixel_values"),
            "image_grid_thw": encoded.get("image_grid_thw"),
            "task": task,
        }

    def _marker_block_ids(self, input_ids: list[int]) -> list[int]:
        """Block id per token from the `<|obj_start|> ... <|obj_end|>` spans (the model's own rule), -1 outside."""
        processor = self.processor
        start, end = processor.token_id(processor.obj_start_token), processor.token_id(processor.obj_end_token)
        ids, current, inside = [], -1, False
        for token in input_ids:
            if token == start:
                current, inside = current + 1, True
            ids.append(current if inside else -1)
            if token == end:
                inside = False
        return ids

    def _batch_block_ids(self, rows: list[list[dict]], width: int) -> torch.LongTensor:
        """`(rows, width)` block ids: each sample's own (block-wise layouts) or its markers', numbered on along the
        packed row so that no two blocks of a row share an id; -1 outside blocks and on padding."""
        block_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            position, offset = 0, 0
            for sample in row:
                ids = torch.tensor(sample["shape_block_ids"] or self._marker_block_ids(sample["input_ids"]))
                block_ids[r, position:position + len(ids)] = torch.where(ids >= 0, ids + offset, ids)
                offset += int(ids.max()) + 1 if bool((ids >= 0).any()) else 0
                position += len(ids)
        return block_ids

    # ------------------------------------------------------------------------------------------------------------
    def _pack(self, samples: list[dict]) -> list[list[dict]]:
        if self.max_tokens is None:
            return [[s] for s in samples]
        rows, lengths = [], []
        for sample in samples:
            length = len(sample["input_ids"])
            if length > self.max_tokens:
                raise ValueError(
                    f"Sample {sample['uid']!r} ({sample['task']}) has {length} tokens, more than the packing budget "
                    f"max_tokens={self.max_tokens}."
                )
            if rows and lengths[-1] + length <= self.max_tokens:  # next fit: sample order = row-major order
                rows[-1].append(sample)
                lengths[-1] += length
            else:
                rows.append([sample])
                lengths.append(length)
        return rows

    def __call__(self, examples: list[dict]) -> dict:
        samples = [self.build_sample(example) for example in examples]
        rows = self._pack(samples)
        pad_id = self.processor.tokenizer.pad_token_id or 0
        width = max(sum(len(s["input_ids"]) for s in row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        sample_ids = torch.zeros((len(rows), width), dtype=torch.long)
        latents, loss_mask, pixel_values, grids, point_features = [], [], [], [], []
        for r, row in enumerate(rows):
            position = 0
            for k, sample in enumerate(row):
                length = len(sample["input_ids"])
                input_ids[r, position:position + length] = torch.tensor(sample["input_ids"])
                labels[r, position:position + length] = torch.tensor(sample["labels"])
                attention_mask[r, position:position + length] = 1
                sample_ids[r, position:] = k  # padding joins the last sample (masked out by attention_mask)
                position += length
                # Row-major order of `<|obj_pad|>` and image tokens = row, then sample order within the row.
                if sample["latents"] is not None:
                    latents.append(sample["latents"])
                    flags = sample["loss_mask"]
                    loss_mask.append(flags if torch.is_tensor(flags) else torch.full((len(sample["latents"]),), flags))
                if sample["point_features"] is not None:
                    point_features.append(sample["point_features"])
                if sample["pixel_values"] is not None:
                    pixel_values.append(sample["pixel_values"])
                    grids.append(sample["image_grid_thw"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.max_tokens is not None:
            batch["packed_sample_ids"] = sample_ids
        if any(sample["shape_block_ids"] is not None for sample in samples):
            batch["shape_block_ids"] = self._batch_block_ids(rows, width)
        if latents and point_features:
            raise ValueError(
                "This batch mixes PointBERT clouds (" + ", ".join(repr(s["uid"]) for s in samples
                                                         if s["point_features"] is not None) +
                ") with ShapeVAE shapes: the model takes `point_features` or `shape_latents` per forward, not both. "
                "Batch the PointLLM set apart (e.g. its own stage or data loader)."
            )
        if point_features:
            batch["point_features"] = torch.cat(point_features)
        if latents:
            batch["shape_latents"] = torch.cat(latents)
            batch["shape_loss_mask"] = torch.cat(loss_mask)
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
            batch["image_grid_thw"] = torch.cat(grids)
        if self.return_uids:
            batch["sample_uids"] = [sample["uid"] for sample in samples]
        return batch


__all__ = ["CAPTION_TASKS", "CGMLLMDataCollator", "GENERATION_TASKS", "IMAGE_TASKS", "TASKS"]
