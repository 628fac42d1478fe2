"""A pairwise LLM judge through an OpenAI-compatible chat-completions endpoint.

Every pair (prompt, candidate answer, baseline answer) is judged twice, once in each order, so that a judge's
preference for the first (or second) position cancels out: a pair's outcome for the candidate is the mean
of its two verdicts (win 1, tie ½, loss 0), so a judge that contradicts itself across orders scores a tie. A
reply that is not A, B or TIE (alone, or first and followed by punctuation) counts as a tie and is counted
(judge_unparsed_fraction).

Verdicts are cached by (model, template, prompt, first, second), in a JSONL file that a later run (or the
retry of this one) reads back: an answer judged once is never paid for again. Before the first request the
judge counts the uncached requests the whole evaluation needs; more than `max_requests` stops it with
nothing spent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.http import post_json
from rlhf_components.evaluate.config import JudgeConfig

log = logging.getLogger(__name__)

WHERE = "evaluate.judge"
UNPARSED = "?"
# The candidate's score for each verdict, by the candidate's position.
_CANDIDATE_FIRST = {"A": 1.0, "B": 0.0, "TIE": 0.5, UNPARSED: 0.5}
_CANDIDATE_SECOND = {"A": 0.0, "B": 1.0, "TIE": 0.5, UNPARSED: 0.5}
# The verdict alone, or first and followed by punctuation or a line break ("A", "**B**", "Tie: both are
# fine"); "A great answer" is prose that starts with an article, not a verdict.
_VERDICT = re.compile(r"^\W*(A|B|TIE)(?:\W*$|\s*[.:;,)\]*\-\n])", re.IGNORECASE)

Pairs = tuple[Sequence[str], Sequence[str], Sequence[str]]
"""(prompts, candidate answers, baseline answers), aligned"""


def parse_verdict(reply: str) -> str:
    """A, B or TIE from the judge's reply (any case), else UNPARSED."""
    found = _VERDICT.match(reply.strip())
    return found.group(1).upper() if found else UNPARSED


@dataclass
class PairwiseJudge:
    config: JudgeConfig
    cache_uri: str
    verdicts: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    verdicts_read: int = 0
    unparsed: int = 0

    @classmethod
    def open(cls, config: JudgeConfig, default_cache_uri: str) -> PairwiseJudge:
        uri = config.cache or default_cache_uri
        judge = cls(config, uri)
        if storage.exists(uri):
            for _, line in storage.read_jsonl(uri):
                entry = json.loads(line)
                judge.verdicts[entry["key"]] = entry["verdict"]
            log.info("%s: %d cached verdicts from %s", WHERE, len(judge.verdicts), uri)
        return judge

    def _key(self, prompt: str, first: str, second: str) -> str:
        payload = json.dumps([self.config.model, self.config.template, prompt, first, second])
        return hashlib.sha256(payload.encode()).hexdigest()

    def _messages(self, prompt: str, first: str, second: str) -> list[dict[str, str]]:
        content = (
            self.config.template.replace("{prompt}", prompt)
            .replace("{first}", first)
            .replace("{second}", second)
        )
        return [{"role": "user", "content": content}]

    def _ask(self, question: tuple[str, str, str]) -> str:
        key_env = self.config.api_key_env
        headers = (
            {"Authorization": f"Bearer {os.environ[key_env]}"} if key_env and key_env in os.environ else {}
        )
        answer = post_json(
            self.config.url.rstrip("/") + "/chat/completions",
            {
                "model": self.config.model,
                "messages": self._messages(*question),
                "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens,
            },
            where=WHERE,
            timeout_s=self.config.timeout_s,
            retries=self.config.retries,
            headers=headers,
        )
        try:
            reply = answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{WHERE}: {self.config.url} did not answer a chat completion") from None
        return parse_verdict(str(reply))

    def compare(self, comparisons: dict[str, Pairs]) -> dict[str, list[float]]:
        """The candidate's outcome per pair (1 win, ½ tie, 0 loss) for each named comparison."""
        questions: dict[str, tuple[str, str, str]] = {}
        # Per comparison, per pair: the keys of (candidate first, candidate second); None for two identical
        # answers, a tie without asking.
        asked: dict[str, list[tuple[str, str] | None]] = {}
        for name, (prompts, candidate, baseline) in comparisons.items():
            asked[name] = []
            for prompt, ours, theirs in zip(prompts, candidate, baseline, strict=True):
                if ours == theirs:
                    asked[name].append(None)
                    continue
                orders = ((prompt, ours, theirs), (prompt, theirs, ours))
                keys = (self._key(*orders[0]), self._key(*orders[1]))
                questions.update(zip(keys, orders, strict=True))
                asked[name].append(keys)
        missing = [key for key in questions if key not in self.verdicts]
        cached = len(questions) - len(missing)
        if self.requests + len(missing) > self.config.max_requests:
            raise UserError(
                f"{WHERE}.max_requests: this evaluation needs {len(missing)} judge requests "
                f"({cached} more verdicts are cached), over the cap of "
                f"{self.config.max_requests}; raise it, or judge fewer prompts (evaluate.max_prompts)"
            )
        log.info("%s: %d verdicts to read, %d of them cached", WHERE, len(questions), cached)
        try:
            with ThreadPoolExecutor(self.config.concurrency) as pool:
                answers = pool.map(self._ask, [questions[key] for key in missing])
                for key, verdict in zip(missing, answers, strict=True):
                    self.verdicts[key] = verdict
                    self.requests += 1
        finally:  # what was paid for is kept, even when a later request fails
            storage.write_jsonl(self.cache_uri, ({"key": k, "verdict": v} for k, v in self.verdicts.items()))
        return {name: [self._outcome(keys) for keys in pairs] for name, pairs in asked.items()}

    def _outcome(self, keys: tuple[str, str] | None) -> float:
        if keys is None:
            return 0.5
        first, second = self.verdicts[keys[0]], self.verdicts[keys[1]]
        self.verdicts_read += 2
        self.unparsed += (first == UNPARSED) + (second == UNPARSED)
        return (_CANDIDATE_FIRST[first] + _CANDIDATE_SECOND[second]) / 2
