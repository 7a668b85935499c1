"""Train a small byte-level BPE tokenizer (the same family as Qwen's BBPE) with the special tokens CG-MLLM uses.

Real checkpoints use the Qwen3-VL tokenizer; this is for small worlds (tests, the tiny procedural world) where a
150k vocabulary would dwarf the model.
"""

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

from .configuration_cgmllm import SHAPE_SPECIAL_TOKENS


# Qwen3-VL's own special tokens (same strings), then the 3D tokens.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def train_bbpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`.

    The special tokens get the first ids (0 = `<|endoftext|>`, also used for padding), followed by the 256 byte
    symbols and the learned merges, so any string can be encoded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special_tokens = list(QWEN_SPECIAL_TOKENS) + list(SHAPE_SPECIAL_TOKENS)
    if vocab_size < len(special_tokens) + 256:
        raise ValueError(f"`vocab_size` must be at least {len(special_tokens) + 256} (specials + 256 bytes).")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=special_tokens[1:],
    )


__all__ = ["QWEN_SPECIAL_TOKENS", "train_bbpe_tokenizer"]
