"""Each step runs alone: `python -m rlhf_components.<step> --config job.yaml`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml

from rlhf_components.demo import DemoAssets


def run_step(step: str, job: dict[str, object], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    job_path = tmp_path / f"{step}.yaml"
    job_path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", f"rlhf_components.{step}", "--config", str(job_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


def test_collect_prompts_runs_alone_under_its_own_finished_parent_run(
    tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "standalone"}
    job = {
        "context": {"tracking": tracking, "output_root": str(tmp_path / "out")},
        "inputs": {},
        "config": {"sources": [tiny_assets.prompts_file], "eval_fraction": 0.2},
    }
    done = run_step("collect_prompts", job, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = json.loads(done.stdout)
    assert Path(outputs["manifest"]).is_file()
    assert outputs["counts"]["kept"] == outputs["counts"]["train"] + outputs["counts"]["eval"]
    client = mlflow.MlflowClient(tracking["uri"])
    experiment = client.get_experiment_by_name("standalone")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`rlhf.standalone_step` = 'collect_prompts'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_bad_job_file_is_one_line_naming_the_field(tmp_path: Path) -> None:
    done = run_step(
        "ppo",
        {"inputs": {"policy": "x", "reward_model": "y", "prompts": "z"}, "config": {"cliprange": -1}},
        tmp_path,
    )
    assert done.returncode == 2
    assert "config.cliprange" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
