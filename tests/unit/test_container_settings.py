"""What the container build and `--runner docker` derive from this machine, without a container engine:
the build's pip settings (containers/pip_build_flags.py), the folders a run shares, the image's name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_pipelines import components, containers
from rlhf_pipelines.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]


def pip_build_flags(tmp_path: Path, pip_conf: str, *torch: str) -> tuple[str, str]:
    """(the printed flags, the pip.conf written for the build), with only `pip_conf` and the machine's
    global pip files in effect."""
    conf_file = tmp_path / "pip.conf"
    conf_file.write_text(pip_conf, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=str(conf_file), HOME=str(tmp_path))
    build_conf = tmp_path / "build" / "container-pip.conf"
    done = subprocess.run(
        [sys.executable, str(ROOT / "containers" / "pip_build_flags.py"), str(build_conf), *torch],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return done.stdout.strip(), build_conf.read_text(encoding="utf-8")


def test_the_build_gets_the_machines_pip_settings_and_the_folders_they_name(tmp_path: Path) -> None:
    wheels, mirror = tmp_path / "wheels", tmp_path / "mirror"
    (mirror / "simple").mkdir(parents=True)
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    pip_conf = (
        f"[global]\nfind-links = {wheels}\n"
        f"extra-index-url = file://{mirror}/simple https://mirror.example/simple\n"
        f"constraint = {tmp_path / 'missing.txt'}\ntimeout = 60\n"
    )
    flags, build_conf = pip_build_flags(tmp_path, pip_conf, "2.13.0", "cpu")
    volumes = dict(re.findall(r"--volume (\S+?):(\S+?):ro", flags))
    assert volumes[str(tmp_path / "build" / "container-pip.conf")] == "/etc/pip.conf"
    assert volumes[str(wheels)] == str(wheels)
    assert volumes[str(mirror)] == str(mirror)  # a file:// index links its files relative to itself
    assert str(tmp_path / "missing.txt") not in volumes  # nothing that does not exist
    assert flags.endswith("--build-arg TORCH_INDEX_URL=")  # the local CPU wheel, not the PyTorch index
    assert f"find-links = {wheels}\n" in build_conf and "timeout = 60\n" in build_conf
    assert "https://mirror.example/simple" in build_conf

    flags, _ = pip_build_flags(tmp_path, pip_conf, "2.13.0", "cu128")
    assert "TORCH_INDEX_URL" not in flags  # no local wheel of that build: the CUDA index it is


def tiny_config(root: Path, source: Path) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "policy": str(root / "models" / "sft"),
            "storage_root": str(root / "work" / "outputs"),
            "feedback_inbox": str(root / "inbox"),
            "tracking": {"uri": f"sqlite:///{root / 'db' / 'mlflow.db'}"},
            "collect_prompts": {"sources": [str(source)]},
        }
    )


def test_a_container_run_shares_every_local_folder_of_the_config_once(tmp_path: Path) -> None:
    for folder in ("work", "models/sft", "data"):
        (tmp_path / folder).mkdir(parents=True)
    source = tmp_path / "data" / "prompts.jsonl"
    source.touch()
    folders = containers.folders_to_share(tiny_config(tmp_path, source), [tmp_path / "work"])
    # outputs/ lies inside work/; what the run writes is made first (the inbox, the sqlite store's folder),
    # what it reads is shared where it is; a file through its folder.
    expected = ["data", "db", "inbox", "models/sft", "work"]
    assert folders == [tmp_path / folder for folder in expected]
    assert all(folder.is_dir() for folder in folders) and (tmp_path / "work" / "outputs").is_dir()


def test_a_container_run_refuses_to_share_the_hosts_root(tmp_path: Path) -> None:
    source = tmp_path / "prompts.jsonl"
    source.touch()
    with pytest.raises(Exception, match="cannot share the host's /"):
        containers.folders_to_share(tiny_config(tmp_path, source), [Path("/")])


def test_make_images_builds_the_image_the_components_name() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    [default] = re.findall(r"^RLHF_IMAGE \?= (\S+)$", makefile, flags=re.MULTILINE)
    if "RLHF_IMAGE" not in os.environ:
        assert default.replace("$(IMAGE_TORCH)", "cpu") == components.IMAGE
