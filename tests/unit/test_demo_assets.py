"""The demo task: grammar, gold judge, tokenizer, and the cached asset build."""

from __future__ import annotations

import json
import random
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_components.demo import (
    GOLD_JUDGE_NAME,
    DemoAssets,
    DemoAssetsSpec,
    build_demo_assets,
    gold_score,
)
from rlhf_components.demo.grammar import (
    NEGATIVE_ADJECTIVES,
    NEGATIVE_VERDICTS,
    NEUTRAL_ADJECTIVES,
    NEUTRAL_VERDICTS,
    POSITIVE_ADJECTIVES,
    POSITIVE_VERDICTS,
    build_corpus,
    build_prompts,
    matches_grammar,
    sample_prompt,
    sample_review,
)
from rlhf_components.demo.tokenizer import EOS_TOKEN, PAD_TOKEN, train_tokenizer

SMALL_SPEC = DemoAssetsSpec(n_corpus=300, n_prompts=50, sft_steps=20, n_embd=32, n_head=4, n_layer=1)


# --- grammar -------------------------------------------------------------------------------------


def test_grammar_is_a_function_of_the_seed() -> None:
    assert build_corpus(50, seed=3) == build_corpus(50, seed=3)
    assert build_prompts(50, seed=3) == build_prompts(50, seed=3)
    assert build_corpus(50, seed=3) != build_corpus(50, seed=4)
    assert build_prompts(50, seed=3) != build_prompts(50, seed=4)


def test_grammar_ignores_the_global_random_state() -> None:
    random.seed(1)
    first = build_corpus(20, seed=0)
    random.seed(2)
    assert build_corpus(20, seed=0) == first


def test_prompts_are_varied_short_and_end_with_a_colon() -> None:
    prompts = build_prompts(2000, seed=0)
    assert 60 <= len(set(prompts)) <= 300
    assert all(p.endswith(":") and len(p.split()) <= 12 for p in prompts)


def test_reviews_have_the_promised_shape() -> None:
    corpus = build_corpus(2000, seed=0)
    for _, review in corpus:
        assert review.startswith(" ") and not review.startswith("  ")
        assert 8 <= len(review.split()) <= 20, review
        assert review.endswith(".")
        assert matches_grammar(review), review


def test_sentiment_steers_the_review() -> None:
    def mean_gold(sentiment: float) -> float:
        rng = random.Random(0)
        return statistics.mean(gold_score("", sample_review(rng, sentiment)) for _ in range(500))

    assert mean_gold(1.0) > 0.4
    assert mean_gold(-1.0) < -0.4
    assert mean_gold(1.0) > mean_gold(0.5) > mean_gold(0.0) > mean_gold(-0.5) > mean_gold(-1.0)
    with pytest.raises(ValueError, match="sentiment"):
        sample_review(random.Random(0), 1.5)


def test_corpus_is_balanced() -> None:
    corpus = build_corpus(4000, seed=0)
    assert abs(statistics.mean(gold_score(p, r) for p, r in corpus)) < 0.05


def test_review_kind_follows_the_prompt_kind() -> None:
    rng = random.Random(0)
    restaurant_prompts = {sample_prompt(rng, "restaurant") for _ in range(300)}
    product_prompts = {sample_prompt(rng, "product") for _ in range(300)}
    assert not any(" I bought " in p or " gift" in p for p in restaurant_prompts)
    assert not any(" on Main Street" in p or " downtown" in p for p in product_prompts)
    products = [sample_review(rng, 0.0, "product") for _ in range(200)]
    restaurants = [sample_review(rng, 0.0, "restaurant") for _ in range(200)]
    assert not any(" food " in review or " staff " in review for review in products)
    assert not any(" design " in review or " packaging " in review for review in restaurants)


def test_matches_grammar_rejects_off_grammar_text() -> None:
    assert matches_grammar(" The food was great and the staff were lovely. Highly recommended.")
    assert not matches_grammar(" The food was great.")  # one short sentence is never generated
    assert not matches_grammar(" great great great great great")
    assert not matches_grammar("The food was great and the staff were lovely.")  # no leading space
    assert not matches_grammar("")


# --- gold judge ----------------------------------------------------------------------------------


def test_gold_judge_orders_sentiment() -> None:
    positive = " The food was excellent and the staff were lovely. Highly recommended."
    neutral = " The food was okay and the staff were average. It did the job."
    negative = " The food was awful and the staff were rude. A complete waste of money."
    assert gold_score("p", positive) > gold_score("p", neutral) == 0.0 > gold_score("p", negative)
    assert GOLD_JUDGE_NAME == "demo-gold-sentiment"


def test_gold_judge_is_bounded_and_ignores_case() -> None:
    assert gold_score("p", " GREAT food.") == gold_score("p", " great food.")
    assert -1.0 <= gold_score("p", " great " * 40) <= 1.0
    assert -1.0 <= gold_score("p", " awful " * 40) <= 1.0


def test_gold_judge_penalizes_degenerate_text() -> None:
    assert gold_score("p", "") == -1.0
    assert gold_score("p", "   ...  ") == -1.0
    three = gold_score("p", " great great great food.")
    four = gold_score("p", " great great great great food.")
    assert four < three
    assert four < gold_score("p", " great food.")


@pytest.mark.parametrize(
    ("phrases", "sign"),
    [
        (POSITIVE_ADJECTIVES + POSITIVE_VERDICTS, 1),
        (NEUTRAL_ADJECTIVES + NEUTRAL_VERDICTS, 0),
        (NEGATIVE_ADJECTIVES + NEGATIVE_VERDICTS, -1),
    ],
)
def test_gold_judge_agrees_with_the_grammar_pools(phrases: tuple[str, ...], sign: int) -> None:
    for phrase in phrases:
        score = gold_score("p", " " + phrase)
        assert (score > 0) - (score < 0) == sign, phrase


# --- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_special_tokens_padding_and_round_trip(tmp_path: Path) -> None:
    corpus = build_corpus(300, seed=0)
    train_tokenizer((p + r for p, r in corpus), tmp_path, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)

    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) <= 400

    for text in [corpus[0][0] + corpus[0][1], "Unseen wörds & symbols: 42 ✓"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    # No EOS/BOS is added implicitly: the trainers append EOS themselves.
    assert tokenizer.eos_token_id not in tokenizer(corpus[0][1])["input_ids"]

    batch = tokenizer(["short", corpus[0][0]], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


def test_prompt_and_response_tokenize_independently(tmp_path: Path) -> None:
    corpus = build_corpus(300, seed=0)
    tokenizer = train_tokenizer((p + r for p, r in corpus), tmp_path, vocab_size=600)
    for prompt, response in corpus[:50]:
        joined = tokenizer(prompt + response)["input_ids"]
        assert joined == tokenizer(prompt)["input_ids"] + tokenizer(response)["input_ids"]


def test_tokenizer_rejects_a_vocabulary_smaller_than_the_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["text"], tmp_path, vocab_size=100)


# --- assets --------------------------------------------------------------------------------------


def _read_jsonl(path: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_spec_rejects_unknown_fields_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="n_corpuss"):
        DemoAssetsSpec.model_validate({"n_corpuss": 10})
    with pytest.raises(ValueError, match="divisible"):
        DemoAssetsSpec(n_embd=30, n_head=4)
    assert DemoAssetsSpec().spec_hash() == DemoAssetsSpec().spec_hash()
    assert DemoAssetsSpec(seed=1).spec_hash() != DemoAssetsSpec().spec_hash()


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo_assets(tmp_path_factory.mktemp("small") / "assets", SMALL_SPEC)


@pytest.fixture
def small_copy(small_build: DemoAssets, tmp_path: Path) -> Path:
    """A private copy of the small build, for tests that rebuild or break it."""
    out = tmp_path / "assets"
    shutil.copytree(small_build.root, out, copy_function=shutil.copy2)
    return out


def test_build_produces_a_loadable_safetensors_checkpoint(small_build: DemoAssets) -> None:
    root = Path(small_build.root)
    assert small_build.spec_hash == SMALL_SPEC.spec_hash()
    model_dir = Path(small_build.sft_model_dir)
    assert model_dir.parent == root
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt"))
    # Nothing of the build is left beside the result.
    assert [p.name for p in root.parent.iterdir()] == ["assets"]

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["spec_hash"] == SMALL_SPEC.spec_hash()
    assert DemoAssetsSpec.model_validate(manifest["spec"]) == SMALL_SPEC

    prompts = _read_jsonl(small_build.prompts_file)
    corpus = _read_jsonl(small_build.corpus_file)
    assert len(prompts) == SMALL_SPEC.n_prompts and all(set(r) == {"prompt"} for r in prompts)
    assert len(corpus) == SMALL_SPEC.n_corpus
    assert all(set(r) == {"prompt", "response"} for r in corpus)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.n_embd == SMALL_SPEC.n_embd and model.config.n_layer == SMALL_SPEC.n_layer
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert tokenizer.model_max_length == model.config.n_positions
    with torch.no_grad():
        logits = model(**tokenizer([prompts[0]["prompt"]], return_tensors="pt")).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_build_is_cached_and_rebuilt_on_a_changed_spec(small_copy: Path) -> None:
    manifest_path = small_copy / "manifest.json"
    weights = small_copy / "sft_model" / "model.safetensors"
    stamps = manifest_path.stat().st_mtime_ns, weights.stat().st_mtime_ns

    cached = build_demo_assets(small_copy, SMALL_SPEC)
    assert cached.root == str(small_copy.resolve()) and cached.spec_hash == SMALL_SPEC.spec_hash()
    assert (manifest_path.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamps

    old_corpus = _read_jsonl(cached.corpus_file)
    changed = SMALL_SPEC.model_copy(update={"seed": 1})
    rebuilt = build_demo_assets(small_copy, changed)
    assert rebuilt.spec_hash == changed.spec_hash() != SMALL_SPEC.spec_hash()
    assert json.loads(manifest_path.read_text())["spec_hash"] == changed.spec_hash()
    assert _read_jsonl(rebuilt.corpus_file) != old_corpus
    assert [p.name for p in small_copy.parent.iterdir()] == ["assets"]

    stamp = manifest_path.stat().st_mtime_ns
    build_demo_assets(small_copy, changed, force=True)
    assert manifest_path.stat().st_mtime_ns != stamp


def test_build_is_deterministic(small_build: DemoAssets, tmp_path: Path) -> None:
    again = build_demo_assets(tmp_path / "again", SMALL_SPEC)
    for name in ("model.safetensors", "tokenizer.json"):
        expected = (Path(small_build.sft_model_dir) / name).read_bytes()
        assert (Path(again.sft_model_dir) / name).read_bytes() == expected, name
    assert Path(again.prompts_file).read_bytes() == Path(small_build.prompts_file).read_bytes()
    assert Path(again.corpus_file).read_bytes() == Path(small_build.corpus_file).read_bytes()


def test_an_incomplete_build_is_not_taken_for_a_cached_one(small_copy: Path) -> None:
    (small_copy / "manifest.json").unlink()
    weights = small_copy / "sft_model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    build_demo_assets(small_copy, SMALL_SPEC)
    assert (small_copy / "manifest.json").is_file()
    assert weights.stat().st_mtime_ns != stamp


def test_a_failed_build_leaves_the_previous_one_intact(
    small_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = build_demo_assets(small_copy, SMALL_SPEC)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("rlhf_components.demo.sft.train_sft_policy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_demo_assets(small_copy, SMALL_SPEC.model_copy(update={"seed": 7}))
    assert [p.name for p in small_copy.parent.iterdir()] == ["assets"]
    assert build_demo_assets(small_copy, SMALL_SPEC) == before


# --- quality of the default SFT policy -----------------------------------------------------------


@pytest.mark.slow
def test_default_sft_policy_is_fluent_and_balanced(tmp_path: Path) -> None:
    assets = build_demo_assets(tmp_path / "assets", DemoAssetsSpec())
    model = AutoModelForCausalLM.from_pretrained(assets.sft_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets.sft_model_dir)
    prompts = [row["prompt"] for row in _read_jsonl(assets.prompts_file)][:256]

    torch.manual_seed(0)
    scores, ended, fluent = [], 0, 0
    for start in range(0, len(prompts), 64):
        batch = prompts[start : start + 64]
        encoded = tokenizer(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            generated = model.generate(
                **encoded,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=32,
                pad_token_id=tokenizer.pad_token_id,
            )
        for prompt, row in zip(batch, generated[:, encoded["input_ids"].shape[1] :].tolist(), strict=True):
            if tokenizer.eos_token_id in row:
                ended += 1
                row = row[: row.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(row, skip_special_tokens=True)
            scores.append(gold_score(prompt, text))
            fluent += matches_grammar(text)

    assert ended / len(prompts) >= 0.9
    assert abs(statistics.mean(scores)) < 0.3
    # A balanced mix, not a policy that always writes neutral text.
    assert statistics.pstdev(scores) > 0.3
    assert fluent / len(prompts) >= 0.8


def test_the_chat_demo_is_conversations_read_through_chatml(tmp_path_factory: pytest.TempPathFactory) -> None:
    from rlhf_components.core.models import load_policy
    from rlhf_components.core.records import Message
    from rlhf_components.demo.grammar import SYSTEM_PROMPTS

    spec = SMALL_SPEC.model_copy(update={"chat": True})
    assert spec.spec_hash() != SMALL_SPEC.spec_hash()
    assets = build_demo_assets(tmp_path_factory.mktemp("chat") / "assets", spec)
    prompts = _read_jsonl(assets.prompts_file)
    assert all([turn["role"] for turn in row["prompt"]] == ["system", "user"] for row in prompts)
    assert {row["prompt"][0]["content"] for row in prompts} <= set(SYSTEM_PROMPTS)
    model, fmt = load_policy(assets.sft_model_dir)
    assert fmt.template is not None and model.config.n_positions == 128
    im_end = fmt.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in fmt.stop_ids
    conversation = [Message.model_validate(turn) for turn in prompts[0]["prompt"]]
    rendered = fmt.render(conversation)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert fmt.answer_ids(conversation, " Great food.")[1][-1] == im_end
