"""generate_candidates: K samples per prompt with stable ids, pairwise tasks, Label Studio export."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from itertools import combinations
from pathlib import Path

import mlflow
import pytest

from rlhf_components import generate_candidates
from rlhf_components.core.config import SamplingConfig
from rlhf_components.core.errors import UserError
from rlhf_components.core.models import load_policy
from rlhf_components.core.tracking import RunContext
from rlhf_components.demo import DemoAssets

from ._helpers import child_runs, make_context, read_jsonl, write_jsonl

K = 2
NUM_PROMPTS = 4


def _config(**overrides: object) -> generate_candidates.Config:
    return generate_candidates.Config.model_validate(
        {
            "samples_per_prompt": K,
            "sampling": SamplingConfig(temperature=1.0, max_new_tokens=8),
            "batch_size": 3,
            **overrides,
        }
    )


@pytest.fixture
def prompts_file(tmp_path: Path, tiny_assets: DemoAssets) -> Path:
    """collect_prompts' output shape: {id, prompt}."""
    texts = [row["prompt"] for row in read_jsonl(tiny_assets.prompts_file)][: NUM_PROMPTS + 2]
    rows = [{"id": f"p{i}", "prompt": text} for i, text in enumerate(texts)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def _generate(
    tiny_assets: DemoAssets, prompts: Path, inbox: Path, context: RunContext, policy: str | None = None
) -> generate_candidates.Outputs:
    inputs = generate_candidates.Inputs(
        policy=policy or tiny_assets.sft_model_dir, prompts=str(prompts), inbox=str(inbox)
    )
    return generate_candidates.run(_config(max_prompts=NUM_PROMPTS), inputs, context)


def test_candidates_tasks_and_label_studio_export(
    tmp_path: Path, tiny_assets: DemoAssets, prompts_file: Path, run_context: RunContext
) -> None:
    outputs = _generate(tiny_assets, prompts_file, tmp_path / "inbox", run_context)
    prompts = {row["id"]: row["prompt"] for row in read_jsonl(prompts_file)[:NUM_PROMPTS]}

    candidates = read_jsonl(outputs.candidates)
    assert outputs.num_candidates == len(candidates) == K * NUM_PROMPTS
    per_prompt = Counter(c["prompt_id"] for c in candidates)
    assert per_prompt == dict.fromkeys(prompts, K), "max_prompts keeps the first prompts, K samples each"
    for prompt_id in prompts:
        indexes = sorted(c["sample_index"] for c in candidates if c["prompt_id"] == prompt_id)
        assert indexes == list(range(K))
    for candidate in candidates:
        assert candidate["prompt"] == prompts[candidate["prompt_id"]]
        key = f"{candidate['prompt_id']}\x00{candidate['response']}"
        assert candidate["id"] == hashlib.sha256(key.encode()).hexdigest()[:16]
        assert candidate["policy"] == tiny_assets.sft_model_dir
        assert 1 <= candidate["num_tokens"] <= 8
        if not candidate["ended_with_eos"]:
            assert candidate["num_tokens"] == 8, "without EOS a response runs to max_new_tokens"

    # Tasks: every pair of distinct answers to the same prompt, once.
    by_id = {c["id"]: c for c in candidates}
    tasks = read_jsonl(outputs.tasks)
    assert outputs.num_tasks == len(tasks)
    expected_pairs = set()
    for prompt_id in prompts:
        unique = sorted({c["id"] for c in candidates if c["prompt_id"] == prompt_id})
        expected_pairs |= {(prompt_id, a, b) for a, b in combinations(unique, 2)}
    assert {(t["prompt_id"], t["response_a_id"], t["response_b_id"]) for t in tasks} == expected_pairs
    assert len({t["task_id"] for t in tasks}) == len(tasks)
    for task in tasks:
        a, b = by_id[task["response_a_id"]], by_id[task["response_b_id"]]
        assert a["id"] != b["id"]
        assert a["prompt_id"] == b["prompt_id"] == task["prompt_id"]
        assert (task["response_a"], task["response_b"]) == (a["response"], b["response"])
        assert task["prompt"] == prompts[task["prompt_id"]]
    assert Path(outputs.tasks).parent == tmp_path / "inbox" / "tasks"

    label_studio = json.loads(Path(outputs.label_studio_tasks).read_text(encoding="utf-8"))
    assert isinstance(label_studio, list)
    assert len(label_studio) == len(tasks)
    assert all(set(item) == {"id", "data"} for item in label_studio)
    assert len({item["id"] for item in label_studio}) == len(label_studio)
    assert [item["data"] for item in label_studio] == tasks
    assert Path(outputs.label_studio_tasks).parent == Path(outputs.tasks).parent
    assert Path(outputs.label_studio_config).read_text(encoding="utf-8").startswith("<View>")

    [run] = child_runs(run_context, "generate_candidates")
    assert run.data.metrics["candidates"] == K * NUM_PROMPTS
    assert run.data.metrics["annotation_tasks"] == len(tasks)
    assert 0.0 <= run.data.metrics["candidate_eos_rate"] <= 1.0


def test_same_seed_same_candidates(tmp_path: Path, tiny_assets: DemoAssets, prompts_file: Path) -> None:
    # Three pipeline runs on one store: each writes under its own run id.
    first = _generate(tiny_assets, prompts_file, tmp_path / "inbox", make_context(tmp_path))
    again = _generate(tiny_assets, prompts_file, tmp_path / "inbox", make_context(tmp_path))
    other = _generate(tiny_assets, prompts_file, tmp_path / "inbox", make_context(tmp_path, seed=7))
    assert len({first.candidates, again.candidates, other.candidates}) == 3
    assert read_jsonl(first.candidates) == read_jsonl(again.candidates)
    assert read_jsonl(first.tasks) == read_jsonl(again.tasks)
    assert [c["id"] for c in read_jsonl(other.candidates)] != [c["id"] for c in read_jsonl(first.candidates)]


def test_policy_without_weights_is_a_user_error(
    tmp_path: Path, tiny_assets: DemoAssets, prompts_file: Path, run_context: RunContext
) -> None:
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_assets.sft_model_dir, no_weights)
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(UserError, match="no safetensors weights"):
        _generate(tiny_assets, prompts_file, tmp_path / "inbox", run_context, policy=str(no_weights))
    # Pickled weights are never loaded, and the message says what was found.
    (no_weights / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"pickled pytorch_model\.bin"):
        _generate(tiny_assets, prompts_file, tmp_path / "inbox", run_context, policy=str(no_weights))
    with pytest.raises(UserError, match="directory not found"):
        _generate(
            tiny_assets, prompts_file, tmp_path / "inbox", run_context, policy=str(tmp_path / "missing")
        )


def test_empty_prompts_file_is_a_user_error(
    tmp_path: Path, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="no prompts"):
        _generate(tiny_assets, empty, tmp_path / "inbox", run_context)


def test_k_below_two_is_rejected() -> None:
    with pytest.raises(ValueError, match="samples_per_prompt"):
        generate_candidates.Config(samples_per_prompt=1)


def test_conversations_are_answered_and_shown_to_annotators_as_turns(
    tmp_path: Path, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    conversation = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Review of the ramen:"},
    ]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "c", "prompt": conversation}])
    inputs = generate_candidates.Inputs(
        policy=tiny_assets.sft_model_dir, prompts=str(prompts), inbox=str(tmp_path / "inbox")
    )
    outputs = generate_candidates.run(_config(samples_per_prompt=4), inputs, run_context)
    assert all(c["prompt"] == conversation for c in read_jsonl(outputs.candidates))
    assert outputs.num_tasks > 0 and all(t["prompt"] == conversation for t in read_jsonl(outputs.tasks))
    shown = {task["data"]["prompt"] for task in json.loads(Path(outputs.label_studio_tasks).read_text())}
    assert shown == {"System: Be kind.\n\nUser: Review of the ramen:"}


def test_prompts_longer_than_the_limit_are_left_out_counted_and_listed(
    tmp_path: Path, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    rows = [
        {"id": "short", "prompt": "Review of the ramen:"},
        {"id": "long", "prompt": "Review of the ramen and the cafe and the diner and the bakery:"},
    ]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    inputs = generate_candidates.Inputs(
        policy=tiny_assets.sft_model_dir, prompts=str(prompts), inbox=str(tmp_path / "inbox")
    )
    _, fmt = load_policy(tiny_assets.sft_model_dir)
    limit = len(fmt.prompt_ids(rows[0]["prompt"]))
    assert len(fmt.prompt_ids(rows[1]["prompt"])) > limit
    outputs = generate_candidates.run(_config(max_prompt_tokens=limit), inputs, run_context)
    assert {c["prompt_id"] for c in read_jsonl(outputs.candidates)} == {"short"}, "never cut, left out"
    [run] = child_runs(run_context, "generate_candidates")
    assert run.data.metrics["prompts_too_long"] == 1
    listed = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/prompts_too_long.json")
    assert [entry["id"] for entry in listed] == ["long"] and listed[0]["tokens"] > limit
    with pytest.raises(UserError, match=r"no prompts to generate from \(2 read\)"):
        generate_candidates.run(_config(max_prompt_tokens=limit - 1), inputs, make_context(tmp_path / "2"))
