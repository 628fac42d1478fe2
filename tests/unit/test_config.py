"""Pipeline config loading (DESIGN §7): unknown keys and bad values are errors that name the file and the
dotted field; the `rlhf` CLI turns every such mistake into one `error: ...` line and a non-zero exit.

The CLI cases run as real subprocesses of the installed console script. Each takes a few seconds to start
(the CLI imports torch), so the module starts all of them at once, each in its own temporary directory
(its cwd), and the tests then read their results.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_components.core.errors import ConfigError, UserError
from rlhf_pipelines.config import PipelineConfig, load_pipeline_config, with_absolute_paths

from ._helpers import CliResult

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "demo.yaml"
RLHF = Path(sys.executable).parent / "rlhf"
CLI_TIMEOUT_S = 180


def demo_mapping() -> dict[str, Any]:
    data = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def demo_with(path: Path, section: str | None, key: str, value: Any) -> Path:
    """demo.yaml with one key set (at the top level, or inside `section`), written to `path`."""
    data = copy.deepcopy(demo_mapping())
    (data if section is None else data[section])[key] = value
    return write_yaml(path, data)


def local_run_config(root: Path, *, weights: bool, tracking_uri: str | None = None) -> Path:
    """demo.yaml's settings, every path under `root`, no demo_assets, and a policy dir with config.json."""
    policy = root / "policy"
    policy.mkdir()
    (policy / "config.json").write_text('{"model_type": "gpt2"}\n', encoding="utf-8")
    if weights:
        (policy / "model.safetensors").write_bytes(b"")
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "Review of the diner downtown:"}\n', encoding="utf-8")
    data = demo_mapping()
    data.pop("demo_assets")
    data["policy"] = str(policy)
    data["storage_root"] = str(root / "outputs")
    data["feedback_inbox"] = str(root / "inbox")
    data["collect_prompts"]["sources"] = [str(prompts)]
    if tracking_uri is not None:
        data["tracking"]["uri"] = tracking_uri
    return write_yaml(root / "config.yaml", data)


def cli_env() -> dict[str, str]:
    """The test environment without anything that would point the CLI at a real server."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "KF_PIPELINES_", "AWS_"))
    }


# ----------------------------------------------------------------------------- loading in-process


def test_demo_config_validates() -> None:
    config = load_pipeline_config(DEMO_CONFIG)
    assert isinstance(config, PipelineConfig)
    assert config.name == "demo"
    assert config.ppo.rollout_batch_size == 64
    assert config.ppo.num_minibatches == 4
    assert config.collect_prompts.sources == [".rlhf-demo/prompts.jsonl"]
    assert config.tracking.uri is None
    assert config.demo_assets is not None and config.demo_assets.dir == ".rlhf-demo"


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(example: Path) -> None:
    assert isinstance(load_pipeline_config(example), PipelineConfig)


def test_the_lora_example_trains_adapters_on_the_reward_model_and_ppo() -> None:
    config = load_pipeline_config(REPO / "examples" / "lora.yaml")
    assert config.ppo.lora is not None and config.ppo.lora.rank == 16 and config.ppo.lora.dropout == 0
    assert config.train_reward_model.lora is not None
    assert config.dpo.lora is None


def test_config_hash_is_stable_and_tracks_content(tmp_path: Path) -> None:
    first, second = load_pipeline_config(DEMO_CONFIG), load_pipeline_config(DEMO_CONFIG)
    assert first.config_hash() == second.config_hash()
    changed = load_pipeline_config(demo_with(tmp_path / "seed.yaml", None, "seed", 1))
    assert changed.config_hash() != first.config_hash()


@pytest.mark.parametrize(
    ("section", "key", "field"),
    [
        (None, "polcy", "polcy"),
        ("ppo", "learnin_rate", "ppo.learnin_rate"),
        ("tracking", "experiment_name", "tracking.experiment_name"),
    ],
)
def test_unknown_key_names_file_and_dotted_field(
    tmp_path: Path, section: str | None, key: str, field: str
) -> None:
    path = demo_with(tmp_path / "typo.yaml", section, key, 1)
    with pytest.raises(ConfigError) as raised:
        load_pipeline_config(path)
    message = str(raised.value)
    assert str(path) in message
    assert f"{field}: unknown key" in message


def test_unknown_key_two_levels_deep_names_the_full_path(tmp_path: Path) -> None:
    data = demo_mapping()
    data["ppo"]["sampling"]["temprature"] = 0.7
    path = write_yaml(tmp_path / "deep.yaml", data)
    with pytest.raises(ConfigError, match=r"ppo\.sampling\.temprature: unknown key"):
        load_pipeline_config(path)


@pytest.mark.parametrize(
    ("section", "key", "value", "field"),
    [
        ("ppo", "cliprange", -1, "ppo.cliprange"),
        ("ppo", "learning_rate", 0, "ppo.learning_rate"),
        ("ppo", "kl_estimator", "k2", "ppo.kl_estimator"),
        ("ppo", "device", "gpu", "ppo.device"),
        ("evaluate", "device", "cuda:x", "evaluate.device"),
        ("collect_prompts", "eval_fraction", 1.5, "collect_prompts.eval_fraction"),
        (None, "name", "Has Spaces", "name"),
    ],
)
def test_bad_value_names_file_and_field(
    tmp_path: Path, section: str | None, key: str, value: Any, field: str
) -> None:
    path = demo_with(tmp_path / "bad.yaml", section, key, value)
    with pytest.raises(ConfigError) as raised:
        load_pipeline_config(path)
    message = str(raised.value)
    assert str(path) in message
    assert f"{field}: " in message


def test_rollout_batch_not_divisible_by_minibatches_names_the_field(tmp_path: Path) -> None:
    path = demo_with(tmp_path / "batches.yaml", "ppo", "rollout_batch_size", 63)  # 4 minibatches
    with pytest.raises(ConfigError) as raised:
        load_pipeline_config(path)
    message = str(raised.value)
    assert str(path) in message
    assert "ppo" in message and "rollout_batch_size" in message
    assert "63 % 4" in message


@pytest.mark.parametrize("launcher", ["trainjob", "pytorchjob"])
def test_kubernetes_pods_without_s3_storage_name_the_step_and_the_file(tmp_path: Path, launcher: str) -> None:
    path = demo_with(tmp_path / f"{launcher}.yaml", "ppo", "launcher", launcher)
    with pytest.raises(ConfigError) as raised:
        load_pipeline_config(path)
    message = str(raised.value)
    assert str(path) in message
    expected = f"ppo.launcher: {launcher} pods read and write through storage_root, which must be s3://"
    assert expected in message


def test_a_dpo_pipeline_cannot_gate_on_a_reward_model_it_does_not_train(tmp_path: Path) -> None:
    data = demo_mapping()
    data["pipeline"] = "dpo"
    data["register_and_promote"]["gate"]["metric"] = "rm_win_rate"
    path = write_yaml(tmp_path / "dpo.yaml", data)
    with pytest.raises(ConfigError, match="dpo pipeline trains no reward model, so there is no rm_win_rate"):
        load_pipeline_config(path)
    data["register_and_promote"]["gate"]["metric"] = "gold_win_rate"
    assert load_pipeline_config(write_yaml(tmp_path / "ok.yaml", data)).pipeline == "dpo"


@pytest.mark.parametrize(
    ("pipeline", "metric", "message"),
    [
        (
            "rlhf",
            "gold_win_rate",
            "no evaluate.gold_judge is set, so there is no gold_win_rate; gate on rm_win_rate",
        ),
        ("dpo", "gold_win_rate", "no gold_win_rate; this run measures no win rate to gate on"),
        ("dpo", "rm_win_rate", "no rm_win_rate; this run measures no win rate to gate on"),
        (
            "rlhf",
            "judge_win_rate",
            "no evaluate.judge is set, so there is no judge_win_rate; gate on rm_win_rate",
        ),
        ("grpo", "rm_win_rate", "grpo pipeline trains no reward model, so there is no rm_win_rate; this run"),
        ("rlhf", "bleu", "evaluate produces no bleu; gate on rm_win_rate"),
        (
            "rlhf",
            "reward_win_rate",
            "no evaluate.rewards is set, so there is no reward_win_rate; gate on rm_win_rate",
        ),
    ],
)
def test_a_gate_metric_evaluate_cannot_produce_is_refused(
    tmp_path: Path, pipeline: str, metric: str, message: str
) -> None:
    """Such a gate holds every run for ever (a DPO run on a model without a gold judge never promotes)."""
    data = demo_mapping()
    data["pipeline"] = pipeline
    if pipeline == "grpo":
        data["grpo"] = {"rewards": [{"function": "length"}]}
    del data["evaluate"]["gold_judge"]
    data["register_and_promote"]["gate"]["metric"] = metric
    path = write_yaml(tmp_path / "gate.yaml", data)
    with pytest.raises(ConfigError, match=rf"gate\.metric: .*{message}"):
        load_pipeline_config(path)
    data["evaluate"]["gold_judge"] = "demo-gold-sentiment"
    data["register_and_promote"]["gate"]["metric"] = "gold_win_rate"
    assert load_pipeline_config(write_yaml(tmp_path / "ok.yaml", data)).pipeline == pipeline


def test_a_pretrained_reward_model_is_for_rlhf_and_paths_are_made_absolute(tmp_path: Path) -> None:
    data = demo_mapping()
    data["reward_model"] = "rm"
    data["ppo"]["chat_template"] = "templates/chat.jinja"
    config = with_absolute_paths(load_pipeline_config(write_yaml(tmp_path / "rm.yaml", data)))
    assert config.reward_model == str(Path("rm").resolve())
    assert config.ppo.chat_template == str(Path("templates/chat.jinja").resolve())
    assert config.evaluate.chat_template == "auto"
    data["pipeline"] = "dpo"
    data["register_and_promote"]["gate"]["metric"] = "gold_win_rate"
    with pytest.raises(
        ConfigError, match="reward_model: the dpo pipeline trains with no reward model of its own"
    ):
        load_pipeline_config(write_yaml(tmp_path / "dpo.yaml", data))


def test_a_grpo_run_needs_its_section_and_no_inbox_and_its_reward_models_get_absolute_paths(
    tmp_path: Path,
) -> None:
    data = demo_mapping()
    data["pipeline"] = "grpo"
    data["register_and_promote"]["gate"]["metric"] = "gold_win_rate"
    with pytest.raises(ConfigError, match="grpo: the grpo pipeline needs a grpo section"):
        load_pipeline_config(write_yaml(tmp_path / "none.yaml", data))
    data["grpo"] = {"rewards": []}
    with pytest.raises(ConfigError, match=r"grpo\.rewards: the grpo pipeline needs at least one reward"):
        load_pipeline_config(write_yaml(tmp_path / "no-rewards.yaml", data))
    data["pipeline"] = "grpo-feedback"  # its reward model, trained from feedback, is reward enough
    data["register_and_promote"]["gate"]["metric"] = "rm_win_rate"
    assert load_pipeline_config(write_yaml(tmp_path / "feedback.yaml", data)).pipeline == "grpo-feedback"
    data["pipeline"] = "grpo"
    data["register_and_promote"]["gate"]["metric"] = "gold_win_rate"
    data["grpo"] = {"rewards": [{"reward_model": "rm"}, {"function": "exact_match"}]}
    del data["feedback_inbox"]
    config = with_absolute_paths(load_pipeline_config(write_yaml(tmp_path / "grpo.yaml", data)))
    assert config.grpo is not None and config.feedback_inbox is None
    assert [r.reward_model for r in config.grpo.rewards] == [str(Path("rm").resolve()), None]
    data["pipeline"] = "rlhf"
    with pytest.raises(ConfigError, match="feedback_inbox: the rlhf pipeline learns from feedback"):
        load_pipeline_config(write_yaml(tmp_path / "rlhf.yaml", data))


def test_missing_required_section_names_it(tmp_path: Path) -> None:
    data = demo_mapping()
    del data["collect_prompts"]
    path = write_yaml(tmp_path / "no-prompts.yaml", data)
    with pytest.raises(ConfigError, match=r"collect_prompts: Field required"):
        load_pipeline_config(path)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: demo\nseed: 0\npolicy: a: b\n", 3),  # a second mapping value on one line
        ("name: demo\nseed: 0\npolicy: x\n\tstorage_root: y\n", 4),  # a tab cannot indent YAML
    ],
)
def test_invalid_yaml_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_pipeline_config(path)
    message = str(raised.value)
    assert str(path) in message
    assert "not valid YAML" in message
    assert f"line {line}," in message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "shape.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="top level must be a mapping") as raised:
        load_pipeline_config(path)
    assert str(path) in str(raised.value)


def test_missing_file_is_a_clear_not_found_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as raised:
        load_pipeline_config(path)
    assert str(raised.value) == f"{path}: config file not found"
    assert isinstance(raised.value, UserError)


def test_duplicate_key_is_an_error_not_silently_overwritten(tmp_path: Path) -> None:
    text = DEMO_CONFIG.read_text(encoding="utf-8") + "ppo:\n  total_episodes: 64\n"
    path = tmp_path / "duplicate.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="ppo"):
        load_pipeline_config(path)


# ----------------------------------------------------------------------------- the CLI, as a subprocess


@dataclass
class CliCase:
    args: list[str]
    cwd: Path


def _cli_cases(factory: pytest.TempPathFactory) -> dict[str, CliCase]:
    cases: dict[str, CliCase] = {}

    cwd = factory.mktemp("cli-missing")
    cases["missing"] = CliCase(["validate", "missing.yaml"], cwd)

    cwd = factory.mktemp("cli-unknown-key")
    demo_with(cwd / "typo.yaml", "ppo", "learnin_rate", 0.1)
    cases["unknown_key"] = CliCase(["validate", "typo.yaml"], cwd)

    cwd = factory.mktemp("cli-bad-value")
    demo_with(cwd / "bad.yaml", "ppo", "cliprange", -1)
    cases["bad_value"] = CliCase(["validate", "bad.yaml"], cwd)

    cwd = factory.mktemp("cli-valid")
    cases["valid"] = CliCase(["validate", str(DEMO_CONFIG)], cwd)

    cwd = factory.mktemp("cli-run-no-weights")
    local_run_config(cwd, weights=False)
    cases["run_no_weights"] = CliCase(["run", "config.yaml", "--workdir", "work"], cwd)

    cwd = factory.mktemp("cli-run-unreachable")
    # Weights present (an empty placeholder is enough for the preflight), so the tracking server is the
    # only problem in this config.
    local_run_config(cwd, weights=True, tracking_uri="http://127.0.0.1:9")
    cases["run_unreachable"] = CliCase(["run", "config.yaml", "--workdir", "work"], cwd)
    return cases


class CliRuns:
    """The `rlhf` subprocesses of this module, all started at once; each result is waited for on first use."""

    def __init__(self, cases: dict[str, CliCase]) -> None:
        self._running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self._results: dict[str, CliResult] = {}
        try:
            for name, case in cases.items():
                with (case.cwd / "cli.stdout").open("wb") as out, (case.cwd / "cli.stderr").open("wb") as err:
                    process = subprocess.Popen(
                        [str(RLHF), *case.args], cwd=case.cwd, env=cli_env(), stdout=out, stderr=err
                    )
                self._running[name] = (process, case.cwd)
        except BaseException:
            self.stop()
            raise

    def __getitem__(self, name: str) -> CliResult:
        if name not in self._results:
            process, cwd = self._running[name]
            returncode = process.wait(timeout=CLI_TIMEOUT_S)
            self._results[name] = CliResult(
                returncode,
                (cwd / "cli.stdout").read_text(encoding="utf-8"),
                (cwd / "cli.stderr").read_text(encoding="utf-8"),
            )
        return self._results[name]

    def stop(self) -> None:
        for process, _ in self._running.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module", autouse=True)
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliRuns]:
    """Every CLI case of this module, each in its own cwd, started when the module starts (so their seconds
    of imports overlap the in-process tests) and stopped at its end."""
    runs = CliRuns(_cli_cases(tmp_path_factory))
    try:
        yield runs
    finally:
        runs.stop()


def assert_one_line_error(result: CliResult) -> str:
    """Non-zero exit, no traceback, and exactly one non-empty stderr line `error: ...`; returns that line."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("error: "), line
    return line


def test_cli_validate_missing_file(cli: CliRuns) -> None:
    line = assert_one_line_error(cli["missing"])
    assert line == "error: missing.yaml: config file not found"
    assert cli["missing"].returncode == 2


def test_cli_validate_unknown_key(cli: CliRuns) -> None:
    line = assert_one_line_error(cli["unknown_key"])
    assert "typo.yaml" in line
    assert "ppo.learnin_rate: unknown key" in line


def test_cli_validate_bad_value(cli: CliRuns) -> None:
    line = assert_one_line_error(cli["bad_value"])
    assert "bad.yaml" in line
    assert "ppo.cliprange" in line and "greater than 0" in line


def test_cli_validate_demo_config_is_valid(cli: CliRuns) -> None:
    result = cli["valid"]
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    assert "pipeline demo" in result.stdout
    assert "error" not in result.stderr.lower()


def test_cli_run_policy_without_safetensors(cli: CliRuns) -> None:
    line = assert_one_line_error(cli["run_no_weights"])
    assert "safetensors" in line
    assert "policy" in line  # the checkpoint directory that lacks weights is named


def test_cli_run_unreachable_tracking_server(cli: CliRuns) -> None:
    line = assert_one_line_error(cli["run_unreachable"])
    assert "unreachable" in line
    assert "http://127.0.0.1:9" in line
