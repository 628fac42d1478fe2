"""Batched sampling with the KV cache, and log-probs that match it exactly.

Conventions every step shares (they are what makes PPO's importance ratio start at exactly 1):
- prompts are left-padded with a pad token that is not EOS, and position ids follow the attention mask;
- logits are divided by the sampling temperature wherever log-probs are taken;
- a response ends at its first EOS; everything after it is pad and masked out.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_components.core.config import SamplingConfig


@dataclass
class Batch:
    """Left-padded prompts followed by right-padded responses."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    """per response token, at the sampling temperature, from the generation pass itself"""
    ended_with_eos: torch.Tensor

    def sequence(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, attention mask, position ids) of prompt + response."""
        ids = torch.cat([self.query_ids, self.response_ids], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        return ids, mask, positions(mask)

    def rows(self, index: torch.Tensor) -> Batch:
        """The rows at `index`, without the pad columns none of them uses (left of the prompts, right of the
        responses): a minibatch of short answers costs what its own tokens cost, not the longest rollout's."""
        query_mask = self.query_mask[index]
        response_mask = self.response_mask[index]
        first_query_column = int(query_mask.any(0).long().argmax())
        width = max(1, int(response_mask.sum(-1).max()))
        return Batch(
            query_ids=self.query_ids[index, first_query_column:],
            query_mask=query_mask[:, first_query_column:],
            response_ids=self.response_ids[index, :width],
            response_mask=response_mask[:, :width],
            logprobs=self.logprobs[index, :width],
            ended_with_eos=self.ended_with_eos[index],
        )

    def last_token_index(self) -> torch.Tensor:
        """Index into `sequence()` of each row's last real token (the EOS, or the final sampled token)."""
        return self.query_ids.shape[1] + self.response_mask.sum(-1).clamp(min=1) - 1


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def keep_last_logits(model: PreTrainedModel, count: int) -> dict[str, int]:
    """Forward arguments that run the LM head over the last `count` positions only, not over prompt positions
    whose logits nobody reads. A model whose forward lacks `logits_to_keep` (some remote code) computes them
    all, so callers slice the last `count` themselves."""
    return {"logits_to_keep": count} if _takes_logits_to_keep(type(model).forward) else {}


@functools.cache
def _takes_logits_to_keep(forward: Callable[..., object]) -> bool:
    """Once per model class: this is asked on every forward pass of generation and training."""
    return "logits_to_keep" in inspect.signature(forward).parameters


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_prompt_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    encoded = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_prompt_tokens,
        add_special_tokens=False,
    )
    return encoded["input_ids"], encoded["attention_mask"]


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompt + response + EOS, tokenised in two parts as generation sees them, right-padded, keeping the last
    `max_length` tokens (prompts are cut first). Returns (ids, attention mask, response mask): the response
    mask marks the response's tokens and its EOS, never prompt or pad."""
    rows, response_lengths = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (tokenizer(prompt, add_special_tokens=False)["input_ids"] + answer)[-max_length:]
        rows.append(ids)
        response_lengths.append(min(len(answer), len(ids)))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, (ids, answer_length) in enumerate(zip(rows, response_lengths, strict=True)):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        mask[index, : len(ids)] = 1
        response_mask[index, len(ids) - answer_length : len(ids)] = 1
    return input_ids, mask, response_mask


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    config: SamplingConfig,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> Batch:
    """Sample responses token by token with the KV cache; stops as soon as every row has emitted EOS."""
    batch_size = query_ids.shape[0]
    attention = query_mask.clone()
    position = positions(attention)
    output = model(
        input_ids=query_ids,
        attention_mask=attention,
        position_ids=position,
        use_cache=True,
        **keep_last_logits(model, 1),
    )
    position = position[:, -1:]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=query_ids.device)
    tokens: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    for _ in range(config.max_new_tokens):
        scaled = output.logits[:, -1, :].float() / config.temperature
        if config.greedy:
            token = scaled.argmax(-1)
        else:
            probs = _filter_logits(scaled, config.top_k, config.top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = token.masked_fill(finished, pad_token_id)
        token_logprob = scaled.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        tokens.append(token)
        logprobs.append(token_logprob.masked_fill(finished, 0.0))
        finished = finished | (token == eos_token_id)
        if bool(finished.all()):
            break
        attention = torch.cat([attention, attention.new_ones(batch_size, 1)], dim=1)
        position = position + 1
        output = model(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=position,
            past_key_values=output.past_key_values,
            use_cache=True,
        )
    response_ids = torch.stack(tokens, dim=1)
    is_eos = (response_ids == eos_token_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    response_mask = (~after_eos).long()
    return Batch(
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=torch.stack(logprobs, dim=1) * response_mask,
        ended_with_eos=is_eos.sum(-1) > 0,
    )


def response_logits(model: PreTrainedModel, batch: Batch, temperature: float) -> torch.Tensor:
    """Temperature-scaled logits that predicted each response token, [batch, response_len, vocab]."""
    ids, mask, position = batch.sequence()
    width = batch.response_ids.shape[1]
    kept = keep_last_logits(model, width + 1)
    output = model(input_ids=ids, attention_mask=mask, position_ids=position, **kept)
    # From the last prompt token to the second-to-last response token: the positions predicting the response.
    return output.logits[:, -(width + 1) : -1].float() / temperature


def response_logprobs(model: PreTrainedModel, batch: Batch, temperature: float) -> torch.Tensor:
    logits = response_logits(model, batch, temperature)
    token_logprobs = logits.log_softmax(-1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    return token_logprobs * batch.response_mask


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each distribution, from its log-probabilities over the last dimension."""
    return -(log_probs.exp() * log_probs).sum(-1)


def decode_responses(tokenizer: PreTrainedTokenizerBase, batch: Batch) -> list[str]:
    texts = []
    # Python lists first: reading a GPU tensor element by element waits for the device once per token.
    for ids, mask in zip(batch.response_ids.tolist(), batch.response_mask.tolist(), strict=True):
        kept = [t for t, m in zip(ids, mask, strict=True) if m and t != tokenizer.eos_token_id]
        texts.append(str(tokenizer.decode(kept, skip_special_tokens=True)))
    return texts


def sample_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: SamplingConfig,
    max_prompt_tokens: int,
    generator: torch.Generator | None = None,
) -> Batch:
    """Tokenise (left-padded) and sample one batch of prompts on the model's device."""
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    query_ids, query_mask = (t.to(model.device) for t in encoded)
    return sample(
        model, query_ids, query_mask, config, tokenizer.eos_token_id, tokenizer.pad_token_id, generator
    )
