"""Build (once) and cache everything the demo pipeline starts from.

Layout of an assets directory::

    <out_dir>/
      corpus.jsonl     {"prompt", "response"} per line: the SFT corpus
      prompts.jsonl    {"prompt"} per line: the prompts RLHF starts from ({"prompt", "answer"} for the
                       arithmetic task)
      sft_model/       Hugging Face checkpoint (safetensors) + tokenizer of the SFT policy
      manifest.json    the spec and its hash; written last, so its presence means "complete"
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.records import Message, Prompt
from . import arithmetic
from .grammar import SYSTEM_PROMPTS, as_conversation, build_corpus, build_prompts

logger = logging.getLogger(__name__)

# Bump when the grammar, tokenizer or SFT recipe changes, so caches built by older code are rebuilt.
ASSETS_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CORPUS_NAME = "corpus.jsonl"
PROMPTS_NAME = "prompts.jsonl"
SFT_MODEL_NAME = "sft_model"


class DemoAssetsSpec(BaseModel):
    """What to build; every field feeds the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["reviews", "arithmetic"] = Field(
        default="reviews",
        description="reviews: the RLHF demo (sentiment, a gold judge); arithmetic: the GRPO demo (exact "
        "answers, n_prompts unused: every question is a prompt)",
    )
    seed: int = 0
    n_corpus: int = Field(default=4000, ge=2)
    n_prompts: int = Field(default=400, ge=1)
    # 768 covers every word of the grammar as one token (the BPE stops at ~760), so a review is
    # ~14 tokens and prompt + review + EOS fits the 64 positions; 512 splits words and can overflow.
    vocab_size: int = Field(default=768, ge=258)
    n_layer: int = Field(default=2, ge=1)
    n_embd: int = Field(default=128, ge=8)
    n_head: int = Field(default=4, ge=1)
    sft_steps: int = Field(default=400, ge=1)
    sft_batch_size: int = Field(default=32, ge=1)
    sft_lr: float = Field(default=3e-3, gt=0)
    chat: bool = Field(
        default=False,
        description="conversations: each prompt a system turn and a user turn, read through ChatML",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> DemoAssetsSpec:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.task == "arithmetic" and self.chat:
            raise ValueError("chat: the arithmetic task has plain-text prompts only")
        return self

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the spec and the assets format version."""
        payload = {"format_version": ASSETS_FORMAT_VERSION, "spec": self.model_dump(mode="json")}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class DemoAssets(BaseModel):
    """Where the built assets are (absolute paths)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str
    sft_model_dir: str
    prompts_file: str
    corpus_file: str
    spec_hash: str

    @classmethod
    def at(cls, root: Path, spec_hash: str) -> DemoAssets:
        return cls(
            root=str(root),
            sft_model_dir=str(root / SFT_MODEL_NAME),
            prompts_file=str(root / PROMPTS_NAME),
            corpus_file=str(root / CORPUS_NAME),
            spec_hash=spec_hash,
        )


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _cached(root: Path, spec_hash: str) -> DemoAssets | None:
    """The assets at ``root`` if a complete build of ``spec_hash`` is there, else None."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("spec_hash") != spec_hash:
        return None
    assets = DemoAssets.at(root, spec_hash)
    required = (Path(assets.corpus_file), Path(assets.prompts_file), Path(assets.sft_model_dir))
    return assets if all(path.exists() for path in required) else None


TaskData = tuple[list[tuple[str, str]], list[tuple[Any, str]], list[dict[str, Any]]]
"""(prompt text, response) pairs, the SFT corpus (prompts as the policy reads them), the prompt rows"""


def _reviews(spec: DemoAssetsSpec) -> TaskData:
    texts = build_corpus(spec.n_corpus, seed=spec.seed)
    # A different stream from the corpus, so the RLHF prompts are not the SFT prompts in order.
    prompt_texts = build_prompts(spec.n_prompts, seed=spec.seed + 1)
    rng = random.Random(spec.seed + 2)
    corpus: list[tuple[Any, str]] = [(as_conversation(p, rng) if spec.chat else p, r) for p, r in texts]
    prompts = [{"prompt": as_conversation(p, rng) if spec.chat else p} for p in prompt_texts]
    return texts, corpus, prompts


def _arithmetic(spec: DemoAssetsSpec) -> TaskData:
    texts = arithmetic.build_corpus(spec.n_corpus, seed=spec.seed)
    prompts: list[dict[str, Any]] = [{"prompt": q, "answer": a} for q, a in arithmetic.build_problems()]
    return texts, list(texts), prompts


def _build_into(staging: Path, spec: DemoAssetsSpec, spec_hash: str) -> None:
    # Imported here: torch and transformers are only needed to build, not to describe, the assets.
    from .sft import train_sft_policy
    from .tokenizer import train_tokenizer

    texts, corpus, prompt_rows = (_arithmetic if spec.task == "arithmetic" else _reviews)(spec)
    _write_jsonl(staging / CORPUS_NAME, ({"prompt": p, "response": r} for p, r in corpus))
    _write_jsonl(staging / PROMPTS_NAME, prompt_rows)
    model_dir = staging / SFT_MODEL_NAME
    system_turns = SYSTEM_PROMPTS if spec.chat else ()
    tokenizer = train_tokenizer(
        [*(prompt + response for prompt, response in texts), *system_turns],
        model_dir,
        vocab_size=spec.vocab_size,
        chat=spec.chat,
    )
    train_sft_policy(
        [(_prompt(p), r) for p, r in corpus],
        tokenizer,
        model_dir,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_embd=spec.n_embd,
        steps=spec.sft_steps,
        batch_size=spec.sft_batch_size,
        lr=spec.sft_lr,
        seed=spec.seed,
    )
    _write_json_atomic(
        staging / MANIFEST_NAME,
        {
            "format_version": ASSETS_FORMAT_VERSION,
            "spec": spec.model_dump(mode="json"),
            "spec_hash": spec_hash,
            "files": {
                "corpus": CORPUS_NAME,
                "prompts": PROMPTS_NAME,
                "sft_model": SFT_MODEL_NAME,
            },
        },
    )


def _prompt(prompt: str | list[dict[str, str]]) -> Prompt:
    return prompt if isinstance(prompt, str) else [Message.model_validate(m) for m in prompt]


def _new_sibling_dir(root: Path, purpose: str) -> Path:
    # Not tempfile.mkdtemp: its 0700 mode would stick to the assets once renamed into place.
    path = root.parent / f".{root.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def build_demo_assets(out_dir: str | Path, spec: DemoAssetsSpec, force: bool = False) -> DemoAssets:
    """Build the demo corpus, prompts and SFT policy into ``out_dir``, or reuse a matching build.

    Deterministic from ``spec.seed``. The build happens in a sibling temporary directory that is
    renamed into place only when complete, so an interrupted build never looks like a finished one
    and a previous build stays intact until the new one is ready.
    """
    root = Path(out_dir).resolve()
    spec_hash = spec.spec_hash()
    if not force and (assets := _cached(root, spec_hash)) is not None:
        logger.info("demo assets up to date at %s (spec %s)", root, spec_hash[:12])
        return assets

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling_dir(root, "building")
    started = time.monotonic()
    logger.info("building demo assets into %s (spec %s)", root, spec_hash[:12])
    try:
        _build_into(staging, spec, spec_hash)
        if root.exists():
            # rename() cannot replace a non-empty directory: move the old build aside first.
            retired = _new_sibling_dir(root, "old")
            os.replace(root, retired / root.name)
            os.replace(staging, root)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("demo assets built in %.1f s at %s", time.monotonic() - started, root)
    return DemoAssets.at(root, spec_hash)
