"""The distribution: every step folder is packaged under its import name, as a wheel and editable."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"rlhf_components": ROOT / "components", "rlhf_pipelines": ROOT / "pipelines"}


def declared_packages() -> set[str]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return set(tomllib.load(handle)["tool"]["setuptools"]["packages"])


def package_folders() -> set[str]:
    found = set()
    for name, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            found.add(".".join([name, *relative.parts]))
    return found


def test_every_package_folder_is_declared() -> None:
    assert package_folders() == declared_packages()


def test_installed_package_resolves_to_the_source_folders() -> None:
    import rlhf_components
    import rlhf_pipelines

    assert Path(rlhf_components.__file__).parent == FOLDERS["rlhf_components"]
    assert Path(rlhf_pipelines.__file__).parent == FOLDERS["rlhf_pipelines"]


@pytest.mark.slow
def test_wheel_contains_import_names_and_console_script(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("rlhf_pipelines-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {"rlhf_components", "rlhf_pipelines"} <= top_level
    assert not {"components", "pipelines", "tests"} & top_level
    for package in declared_packages():
        assert package.replace(".", "/") + "/__init__.py" in names, package
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rlhf = rlhf_pipelines.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
