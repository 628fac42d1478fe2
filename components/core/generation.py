"""Batched sampling with the KV cache, and log-probs that match it exactly.

Conventions every step shares (they are what makes PPO's importance ratio start at exactly 1):
- prompts are left-padded (core.chat: the pad token may be EOS; masks tell padding apart) and position ids
  follow the attention mask;
- logits are divided by the sampling temperature wherever log-probs are taken;
- a response ends at its first stop token (or stop string); everything after it is pad and masked out.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from rlhf_components.core.chat import ChatFormat
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
    fmt: ChatFormat,
    generator: torch.Generator | None = None,
) -> Batch:
    """Sample responses token by token with the KV cache. A response ends at its first stop token (any of
    `fmt.stop_ids`) or when its text comes to contain one of `config.stop_strings`; sampling stops as soon as
    every row has ended."""
    batch_size = query_ids.shape[0]
    stop_ids = torch.tensor(fmt.stop_ids, device=query_ids.device)
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
    lengths = torch.zeros(batch_size, dtype=torch.long, device=query_ids.device)
    tokens: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    for _ in range(config.max_new_tokens):
        scaled = output.logits[:, -1, :].float() / config.temperature
        if config.greedy:
            token = scaled.argmax(-1)
        else:
            probs = _filter_logits(scaled, config.top_k, config.top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = token.masked_fill(finished, fmt.pad_id)
        token_logprob = scaled.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        tokens.append(token)
        logprobs.append(token_logprob.masked_fill(finished, 0.0))
        lengths += (~finished).long()
        finished = finished | torch.isin(token, stop_ids)
        if config.stop_strings:
            finished = finished | _ends_with_stop_string(fmt, tokens, finished, config.stop_strings)
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
    response_mask = (
        torch.arange(response_ids.shape[1], device=response_ids.device) < lengths[:, None]
    ).long()
    return Batch(
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids.masked_fill(response_mask == 0, fmt.pad_id),
        response_mask=response_mask,
        logprobs=torch.stack(logprobs, dim=1) * response_mask,
        ended_with_eos=finished,
    )


def _ends_with_stop_string(
    fmt: ChatFormat, tokens: list[torch.Tensor], finished: torch.Tensor, stop_strings: list[str]
) -> torch.Tensor:
    """Rows whose text, up to the token just sampled, contains a stop string in its last tokens."""
    window = max(len(text) for text in stop_strings) + 1  # a token holds at least one character
    recent = torch.stack(tokens[-window:], dim=1).tolist()
    hits = [
        not done and any(stop in fmt.tokenizer.decode(row) for stop in stop_strings)
        for row, done in zip(recent, finished.tolist(), strict=True)
    ]
    return torch.tensor(hits, device=finished.device)


def response_logits(model: PreTrainedModel, batch: Batch, temperature: float) -> torch.Tensor:
    """Temperature-scaled logits that predicted each response token, [batch, response_len, vocab]."""
    ids, mask, position = batch.sequence()
    width = batch.response_ids.shape[1]
    kept = keep_last_logits(model, width + 1)
    output = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False, **kept)
    # From the last prompt token to the second-to-last response token: the positions predicting the response.
    return output.logits[:, -(width + 1) : -1].float() / temperature


def response_logprobs(model: PreTrainedModel, batch: Batch, temperature: float) -> torch.Tensor:
    logits = response_logits(model, batch, temperature)
    token_logprobs = logits.log_softmax(-1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    return token_logprobs * batch.response_mask


def decode_responses(fmt: ChatFormat, batch: Batch) -> list[str]:
    # Python lists first: reading a GPU tensor element by element waits for the device once per token.
    ids, masks = batch.response_ids.tolist(), batch.response_mask.tolist()
    return [
        fmt.decode([t for t, m in zip(row, mask, strict=True) if m])
        for row, mask in zip(ids, masks, strict=True)
    ]


def sample_prompts(
    model: PreTrainedModel,
    fmt: ChatFormat,
    prompt_ids: list[list[int]],
    config: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Batch:
    """Sample one batch of encoded prompts (`fmt.prompt_ids`), left-padded, on the model's device."""
    query_ids, query_mask = (t.to(model.device) for t in fmt.left_padded(prompt_ids))
    return sample(model, query_ids, query_mask, config, fmt, generator)
