"""The demo's "pretrained" policy: a tiny GPT-2 given a short supervised fine-tuning pass."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from ..core.chat import ChatFormat
from ..core.records import Prompt
from ..core.runtime import progress_disabled

logger = logging.getLogger(__name__)

# Positions beyond the longest prompt + review + EOS (about 35 tokens with the default tokenizer), in steps
# of which a longer corpus (the chat demo's) gets its room.
N_POSITIONS = 64
IGNORE_INDEX = -100
WARMUP_FRACTION = 0.1


def build_policy(
    tokenizer: PreTrainedTokenizerFast, n_layer: int, n_head: int, n_embd: int, n_positions: int = N_POSITIONS
) -> GPT2LMHeadModel:
    """A randomly initialized GPT-2 sized to the tokenizer, with its special token ids set."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def encode_examples(
    fmt: ChatFormat, corpus: Sequence[tuple[Prompt, str]]
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: the prompt as the policy reads it (its chat template, if any), then
    the response and its stop token; the loss only on response and stop token, as PPO will sample them."""
    examples = []
    for prompt, response in corpus:
        prompt_ids, target_ids = fmt.answer_ids(prompt, response)
        examples.append((prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids))
    return examples


def _collate(examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    # Right padding keeps every real token at its natural position id; pads carry no loss.
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(targets)] = torch.tensor(targets)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _batches(n_examples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches for ``steps`` steps: shuffled epochs, each example once per epoch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    batches = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n_examples, generator=generator)])
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def train_sft_policy(
    corpus: Sequence[tuple[Prompt, str]],
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | Path,
    *,
    n_layer: int,
    n_head: int,
    n_embd: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> GPT2LMHeadModel:
    """Build a tiny GPT-2, fine-tune it on ``corpus`` and save model + tokenizer to ``out_dir``.

    AdamW with linear warm-up and linear decay to zero. ``out_dir`` becomes a plain Hugging Face
    checkpoint (safetensors weights), loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs both a pad token and an EOS token")
    examples = encode_examples(ChatFormat.of(tokenizer), corpus)
    # Room for the longest example, in steps of 64 positions (the plain demo needs 64, the chat demo 128).
    n_positions = N_POSITIONS * math.ceil(max(len(ids) for ids, _ in examples) / N_POSITIONS)
    torch.manual_seed(seed)
    model = build_policy(tokenizer, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = max(1, int(WARMUP_FRACTION * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup))),
    )
    logger.info(
        "SFT of a %d-parameter GPT-2 on %d examples: %d steps of %d",
        model.num_parameters(),
        len(examples),
        steps,
        batch_size,
    )
    model.train()
    progress = tqdm(
        _batches(len(examples), batch_size, steps, seed),
        desc="demo SFT",
        unit="step",
        disable=progress_disabled(),
    )
    loss = torch.tensor(float("nan"))
    for batch_indices in progress:
        batch = _collate([examples[i] for i in batch_indices.tolist()], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    logger.info("SFT done, final batch loss %.3f", loss.item())
    model.eval()
    # Generation and truncation defaults that downstream loaders read from the checkpoint.
    tokenizer.model_max_length = n_positions
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return model
