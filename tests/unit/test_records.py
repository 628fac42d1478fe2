"""The dataset readers every consumer uses: records come back validated, a bad row is one line naming its
file and line, and the consumers (trainers, generation, evaluation) read through them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rlhf_components import dpo, generate_candidates, ppo, train_reward_model
from rlhf_components.core.errors import UserError
from rlhf_components.core.records import (
    Preference,
    PreferencePair,
    PromptRow,
    prompt_id,
    read_pairs,
    read_prompts,
)
from rlhf_components.core.tracking import RunContext
from rlhf_components.demo import DemoAssets

from ._helpers import write_jsonl

COMPONENTS = Path(__file__).resolve().parents[2] / "components"


def test_bare_prompts_get_their_content_id_and_line_and_full_records_pass_through(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "Review of the ramen:", "category": "food"},
            {"id": "p2", "prompt": "Review of the lamp:", "source": "s3://bucket/prompts.csv:3"},
        ],
    )
    assert read_prompts(str(path)) == [
        PromptRow(
            id=prompt_id("Review of the ramen:"),
            prompt="Review of the ramen:",
            source=f"{path}:1",
            columns={"category": "food"},  # the row's other fields travel with it
        ),
        PromptRow(id="p2", prompt="Review of the lamp:", source="s3://bucket/prompts.csv:3"),
    ]


def test_pairs_read_from_ingest_feedback_records_and_from_bare_triples(tmp_path: Path) -> None:
    written = Preference(
        id="x",
        prompt="P",
        chosen="good",
        rejected="bad",
        votes=3,
        annotators=["a"],
        simulated=False,
        sources=["labels.jsonl:1"],
    )
    path = write_jsonl(
        tmp_path / "pairs.jsonl", [written.model_dump(), {"prompt": "Q", "chosen": "c", "rejected": "r"}]
    )
    assert read_pairs(str(path)) == [
        PreferencePair(prompt="P", chosen="good", rejected="bad"),
        PreferencePair(prompt="Q", chosen="c", rejected="r"),
    ]


BAD_PAIR = "not a valid preference pair record"


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ('{"prompt": "P", "chosen": "c"}', rf"{BAD_PAIR}: rejected: Field required"),
        (
            '{"prompt": "P", "chosen": 3, "rejected": "r"}',
            rf"{BAD_PAIR}: chosen: Input should be a valid string",
        ),
        ('["P", "c", "r"]', rf"{BAD_PAIR}: row: Input should be .*dictionary"),
        ('{"prompt": "P", "chosen": "c", "rejected": "r"', r"not valid JSON"),
    ],
)
def test_a_bad_pair_names_its_file_and_line(tmp_path: Path, row: str, problem: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "P", "chosen": "c", "rejected": "r"}\n\n' + row + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:3: {problem}"):
        read_pairs(str(path))


def test_a_bad_prompt_names_its_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"text": "no prompt field"}])
    with pytest.raises(UserError, match=rf"^{path}:2: not a valid prompt record: prompt: Field required"):
        read_prompts(str(path))


def test_every_consumer_reads_through_the_validating_readers(
    tmp_path: Path, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    good = {"prompt": "Review of the ramen:", "chosen": " great", "rejected": " awful"}
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [good, {**good, "rejected": None}]))
    prompts = str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Review of the ramen:"}, {"id": "x"}]))
    policy = tiny_assets.sft_model_dir
    runs = [
        lambda: train_reward_model.run(
            train_reward_model.Config(batch_size=1),
            train_reward_model.Inputs(base_model=policy, train=pairs, eval=pairs),
            run_context,
        ),
        lambda: dpo.run(
            dpo.Config(batch_size=1), dpo.Inputs(policy=policy, train=pairs, eval=pairs), run_context
        ),
        lambda: ppo.run(
            ppo.Config(rollout_batch_size=4, num_minibatches=1),
            ppo.Inputs(policy=policy, reward_model=policy, prompts=prompts),
            run_context,
        ),
        lambda: generate_candidates.run(
            generate_candidates.Config(),
            generate_candidates.Inputs(policy=policy, prompts=prompts, inbox=str(tmp_path / "inbox")),
            run_context,
        ),
    ]
    for run in runs:
        with pytest.raises(UserError, match=r"\.jsonl:2: not a valid (preference pair|prompt) record"):
            run()


def _imported_modules(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return imported


def test_no_step_imports_another_step() -> None:
    """Steps share code through core/ (and the demo task through demo/), never sideways."""
    shared = {"core", "demo", "distributed"}
    packages = [p.name for p in COMPONENTS.iterdir() if (p / "__init__.py").is_file()]
    steps = sorted(set(packages) - shared)
    assert {"collect_prompts", "train_reward_model", "ppo", "dpo", "evaluate"} <= set(steps)
    sideways = []
    for step in steps:
        for source in (COMPONENTS / step).glob("*.py"):
            for module in _imported_modules(source):
                parts = [*module.split("."), ""]
                if parts[0] == "rlhf_components" and parts[1] in steps and parts[1] != step:
                    sideways.append(f"{step}/{source.name} imports {module}")
    assert sideways == []
