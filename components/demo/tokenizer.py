"""A byte-level BPE tokenizer trained on the demo corpus, saved as a Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
# A pad token distinct from EOS lets a trainer tell a padded position from a real end of text.
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# The chat demo's turns, ChatML as Qwen and many others write it: an answer ends with <|im_end|>.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, chat: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir`` with ``save_pretrained``.

    Special tokens come first, so ``<|endoftext|>`` (EOS and BOS) is id 0 and ``<|pad|>`` is id 1; with
    ``chat``, ChatML's ``<|im_start|>`` and ``<|im_end|>`` follow and the tokenizer carries a ChatML template.
    Padding is on the left, as generation needs.
    """
    specials = SPECIAL_TOKENS + (CHAT_TOKENS if chat else ())
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(specials):
        raise ValueError(
            f"vocab_size must be at least {len(byte_alphabet) + len(specials)} "
            f"(256 bytes + special tokens), got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        # The full byte alphabet keeps any text encodable, even characters absent from the corpus.
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
    )
    if chat:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
