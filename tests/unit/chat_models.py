"""Tiny random-init checkpoints of real architectures, each with the tokenizer conventions of its family.

Nothing is downloaded: a byte-level BPE is trained here with `tokenizers`, given the family's special tokens,
BOS rule, pad token (or none) and chat template, and saved beside a 1-layer, 32-wide model, as a user's
checkpoint would be saved:

| family | BOS added | EOS (+ generation_config) | pad | template |
|---|---|---|---|---|
| gpt2 | no | `<|endoftext|>` | none: EOS | none |
| llama3 | `<|begin_of_text|>` | `<|end_of_text|>` (+ `<|eot_id|>`) | none: EOS | Llama 3 |
| qwen2 | no | `<|im_end|>` | `<|endoftext|>` | ChatML |
| qwen2-pad-eos | no | `<|endoftext|>` (+ `<|im_end|>`) | = EOS | ChatML |
| gpt_neox | no | `<|endoftext|>` | `<|padding|>` | none |
| mistral | `<s>` | `</s>` | none: EOS | [INST] … [/INST] |
| gemma | `<bos>` | `<eos>` (turns end with `<end_of_turn>`) | `<pad>` | Gemma |
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GenerationConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
    "\n\n{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    specials: tuple[str, ...]
    eos: str
    bos: str | None = None
    add_bos: bool = False
    pad: str | None = None
    template: str | None = None
    generation_stops: tuple[str, ...] = ()
    """more EOS ids for generation_config (the tokenizer's EOS is always one)"""
    turn_end: str | None = None
    """the token the template closes an assistant turn with, when it is not the EOS"""
    extra: dict[str, object] = field(default_factory=dict)


FAMILIES = {
    family.name: family
    for family in (
        Family("gpt2", ("<|endoftext|>",), eos="<|endoftext|>", bos="<|endoftext|>"),
        Family(
            "llama3",
            (
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ),
            eos="<|end_of_text|>",
            bos="<|begin_of_text|>",
            add_bos=True,
            template=LLAMA3_TEMPLATE,
            generation_stops=("<|eot_id|>",),
            turn_end="<|eot_id|>",
        ),
        Family(
            "qwen2",
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            eos="<|im_end|>",
            pad="<|endoftext|>",
            template=CHATML_TEMPLATE,
        ),
        Family(
            "qwen2-pad-eos",
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            template=CHATML_TEMPLATE,
            generation_stops=("<|im_end|>",),
            turn_end="<|im_end|>",
        ),
        Family(
            "gpt_neox",
            ("<|endoftext|>", "<|padding|>"),
            eos="<|endoftext|>",
            bos="<|endoftext|>",
            pad="<|padding|>",
        ),
        Family("mistral", ("<s>", "</s>"), eos="</s>", bos="<s>", add_bos=True, template=MISTRAL_TEMPLATE),
        Family(
            "gemma",
            ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
            eos="<eos>",
            bos="<bos>",
            add_bos=True,
            pad="<pad>",
            template=GEMMA_TEMPLATE,
            turn_end="<end_of_turn>",
        ),
    )
}

WORDS = [
    "the",
    "food",
    "was",
    "great",
    "lovely",
    "awful",
    "bland",
    "staff",
    "kind",
    "rude",
    "review",
    "of",
    "ramen",
    "cafe",
    "lamp",
    "diner",
    "bakery",
    "blender",
    "it",
    "and",
    "but",
    "a",
    "very",
    "not",
    "service",
    "price",
    "fine",
    "good",
    "bad",
    "quick",
    "slow",
    "fresh",
    "system",
    "user",
    "assistant",
    "model",
    "be",
    "brief",
    "answer",
    "question",
    "what",
    "how",
    "please",
    "thanks",
    "hello",
]


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]


def build_tokenizer(family: Family, out_dir: Path) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer)
    if family.add_bos:
        assert family.bos is not None
        bos_id = backend.token_to_id(family.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, bos_id)],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad
    )
    if family.template is not None:
        tokenizer.chat_template = family.template
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def model_config(name: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    vocab = len(tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    small = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 256,
        **ids,
    }
    if name == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=1, n_head=2, **ids)
    if name == "llama3":
        return LlamaConfig(vocab_size=vocab, num_key_value_heads=1, tie_word_embeddings=False, **small)
    if name.startswith("qwen2"):
        return Qwen2Config(vocab_size=vocab, num_key_value_heads=1, **small)
    if name == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, **small)
    if name == "mistral":
        return MistralConfig(vocab_size=vocab, num_key_value_heads=1, sliding_window=None, **small)
    if name == "gemma":
        return GemmaConfig(vocab_size=vocab, num_key_value_heads=1, head_dim=16, **small)
    raise ValueError(name)


def build_checkpoint(name: str, out_dir: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> str:
    """A saved checkpoint of the family (safetensors, tokenizer, generation_config); returns its path."""
    family = FAMILIES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family, out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(name, tokenizer))
    stops = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(family.generation_stops))]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.to(dtype).save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)


def force_token(model: torch.nn.Module, token_id: int) -> None:
    """Make `token_id` the argmax after every position: the output layer gets a bias that only it has."""
    head = model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear)
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[token_id] = 1e4
    model.set_output_embeddings(biased)
