"""How one model reads a prompt and ends an answer: its chat template, BOS, stop tokens and pad token.

Every step that shows a model a prompt (generate_candidates, reward training and scoring, PPO, DPO,
evaluate) goes through a `ChatFormat`, so a prompt means the same token ids everywhere:

- **Template.** `chat_template: auto` uses the tokenizer's template when it has one, `none` never uses one,
  and a path (local or s3://) names a Jinja file. With a template, a plain-text prompt is one user turn and
  the rendering ends with the generation prompt (`add_generation_prompt`). Without one, a prompt's ids are
  its text's (a conversation's turns joined by blank lines): for base models and prompts that are already
  rendered.
- **BOS** follows the tokenizer's own convention: the ids `tokenizer(text)` puts in front of any text are put
  in front of every prompt, once: never missing, never doubled (a template that writes `{{ bos_token }}`
  already has it).
- **Stopping.** The tokenizer's EOS, every EOS id in the model's `generation_config`, and the token a template
  closes an assistant turn with (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`) all end an answer; the same
  set decides truncation, the missing-EOS penalty, where rewards and values are read and the EOS rate.
- **Padding** uses the tokenizer's pad token, or the first stop token when it has none. Masks, not the pad
  id, tell padding from text, so pad = EOS is safe, and a user's vocabulary is never changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.records import Prompt, PromptRow, read_prompts
from rlhf_components.core.tracking import log_dict, log_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatFormat:
    tokenizer: PreTrainedTokenizerBase
    template: str | None
    stop_ids: tuple[int, ...]
    """every token that ends an answer; the first is appended after an answer when there is no template"""
    pad_id: int
    bos_ids: tuple[int, ...]

    @classmethod
    def of(
        cls, tokenizer: PreTrainedTokenizerBase, generation_config: Any = None, chat_template: str = "auto"
    ) -> ChatFormat:
        """The format of a model with this tokenizer and generation config, under a `chat_template`."""
        template = _template(tokenizer, chat_template)
        stops: list[int] = []
        listed = [tokenizer.eos_token_id, *_ids(getattr(generation_config, "eos_token_id", None))]
        for candidate in [*listed, _turn_end(tokenizer, template)]:
            if candidate is not None and candidate not in stops:
                stops.append(int(candidate))
        if not stops:
            raise UserError(
                f"{tokenizer.name_or_path}: the tokenizer has no EOS token and the model lists none"
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        return cls(tokenizer, template, tuple(stops), int(pad_id), _bos_ids(tokenizer))

    # ------------------------------------------------------------------------------------------- prompts

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The ids a model sees before it answers `prompt`."""
        if self.template is None:
            return self._with_bos(self._encode(_plain(prompt)))
        rendered = self.tokenizer.apply_chat_template(
            _dicts(prompt), chat_template=self.template, add_generation_prompt=True, tokenize=False
        )
        return self._with_bos(self._encode(str(rendered)))

    def answer_ids(self, prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids ending with a stop token): the conversation with `response` as the
        assistant's turn, split where the answer starts, as a model that generated it would have seen it."""
        prompt_ids = self.prompt_ids(prompt)
        if self.template is not None:
            conversation = [*_dicts(prompt), {"role": "assistant", "content": response}]
            rendered = self.tokenizer.apply_chat_template(
                conversation, chat_template=self.template, tokenize=False
            )
            full = self._with_bos(self._encode(str(rendered)))
            if full[: len(prompt_ids)] == prompt_ids:
                answer = full[len(prompt_ids) :]
                ends = [i for i, token in enumerate(answer) if token in self.stop_ids]
                if ends:  # what follows the turn's end (ChatML's newline) is never generated
                    return prompt_ids, answer[: ends[0] + 1]
        return prompt_ids, [*self._encode(response), self.stop_ids[0]]

    def render(self, prompt: Prompt) -> str:
        """The text the model reads (special tokens included), for logs and debugging."""
        return str(self.tokenizer.decode(self.prompt_ids(prompt)))

    def decode(self, response_ids: Sequence[int]) -> str:
        """An answer's text, without its stop token."""
        kept = [token for token in response_ids if token not in self.stop_ids]
        return str(self.tokenizer.decode(kept, skip_special_tokens=True))

    # ------------------------------------------------------------------------------------------- batches

    def left_padded(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask), left-padded: generation continues every row at the same column."""
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            if row:
                ids[index, width - len(row) :] = torch.tensor(row)
                mask[index, width - len(row) :] = 1
        return ids, mask

    def answers(
        self, prompts: Sequence[Prompt], responses: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention mask, answer mask) of prompt + answer, right-padded: the answer mask marks the
        answer's tokens and its stop token, never prompt or pad."""
        pairs = [self.answer_ids(p, r) for p, r in zip(prompts, responses, strict=True)]
        return self.right_padded(pairs)

    def right_padded(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(p) + len(a) for p, a in pairs)
        ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        answer_mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for index, (prompt, answer) in enumerate(pairs):
            ids[index, : len(prompt) + len(answer)] = torch.tensor([*prompt, *answer])
            mask[index, : len(prompt) + len(answer)] = 1
            answer_mask[index, len(prompt) : len(prompt) + len(answer)] = 1
        return ids, mask, answer_mask

    # ------------------------------------------------------------------------------------------- details

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = list(self.bos_ids)
        if not bos:
            return ids
        while ids[: 2 * len(bos)] == bos + bos:
            ids = ids[len(bos) :]
        return ids if ids[: len(bos)] == bos else bos + ids


def same_reading(a: ChatFormat, b: ChatFormat) -> bool:
    """Whether two models turn every prompt and answer into the same ids (same vocabulary, template, BOS):
    then one can read the other's tokens."""
    same_text = (a.template, a.bos_ids) == (b.template, b.bos_ids)
    return same_text and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def _turn_end(tokenizer: PreTrainedTokenizerBase, template: str | None) -> int | None:
    """The special token a template closes an assistant turn with, when it has one."""
    if template is None:
        return None
    marker = "rlhf-turn-probe"
    conversation = [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}]
    try:
        rendered = str(tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False))
    except Exception as error:  # the template's own error (jinja2 raises many kinds), as one line
        raise UserError(f"{tokenizer.name_or_path}: the chat template fails: {error}") from None
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    after = tokenizer(rendered.split(marker, 1)[-1], add_special_tokens=False)["input_ids"]
    return next((int(token) for token in after if token in special), None)


def _template(tokenizer: PreTrainedTokenizerBase, setting: str) -> str | None:
    if setting == "none":
        return None
    if setting == "auto":
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        return template or None
    return storage.read_text(setting)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def _bos_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """What the tokenizer puts in front of a text by itself (Llama's BOS; nothing for GPT-2 or Qwen)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    special = tokenizer("x", add_special_tokens=True)["input_ids"]
    at = special.index(plain[0]) if plain and plain[0] in special else 0
    return tuple(special[:at])


def _dicts(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [message.model_dump() for message in prompt]


def _plain(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n\n".join(m.content for m in prompt)


EncodedPrompt = tuple[PromptRow, list[int]]
"""a prompt record with its ids (encode_prompts)"""


def encode_prompts(
    fmt: ChatFormat, uri: str, limit: int, section: str, purpose: str, first: int | None = None
) -> list[EncodedPrompt]:
    """The prompt rows at `uri` (the `first` of them, when given), each with its ids, leaving out (never
    cutting) those longer than `limit` tokens: they are counted (`prompts_too_long`), logged, and listed in
    the step's MLflow run (`prompts_too_long.json`). None left is the user's error: "<uri>: no <purpose>"."""
    records = read_prompts(uri)[:first]
    kept: list[EncodedPrompt] = []
    too_long = []
    for record in records:
        ids = fmt.prompt_ids(record.prompt)
        if len(ids) <= limit:
            kept.append((record, ids))
        else:
            too_long.append({"id": record.id, "source": record.source, "tokens": len(ids)})
    log_metrics({"prompts_too_long": len(too_long)})
    if too_long:
        log.warning(
            "%s: %d of %d prompts are longer than %d tokens and are left out (the first: %s)",
            section,
            len(too_long),
            len(records),
            limit,
            too_long[0]["source"],
        )
        log_dict(too_long, "prompts_too_long.json")
    if not kept:
        longer = (
            f"; all {len(too_long)} are longer than {section}.max_prompt_tokens ({limit})" if too_long else ""
        )
        raise UserError(f"{uri}: no {purpose} ({len(records)} read){longer}")
    return kept


class PromptStream:
    """Prompts in a seeded random order, reshuffled after each pass; its position is part of a checkpoint."""

    def __init__(self, prompts: list[EncodedPrompt], generator: torch.Generator) -> None:
        self.prompts = prompts
        self.generator = generator
        self.order = torch.randperm(len(prompts), generator=generator).tolist()
        self.cursor = 0

    def take(self, count: int) -> list[EncodedPrompt]:
        chosen = []
        for _ in range(count):
            if self.cursor == len(self.order):
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
                self.cursor = 0
            chosen.append(self.prompts[self.order[self.cursor]])
            self.cursor += 1
        return chosen
