"""Print `podman build` flags that give the build's pip this machine's pip configuration.

Machines behind a TLS-inspecting proxy, or with a local package mirror or wheel folder, configure pip in
files and environment variables that a container build does not see. This writes that configuration, as
`pip config list` reports it, into one pip.conf for the build (mounted at /etc/pip.conf) and mounts every
local file or folder it names (CA bundle, constraints, find-links, file:// indexes) read-only at the same
path. Nothing of it stays in the image. On a machine with no pip configuration it prints nothing.
Where a find-links folder holds the wanted PyTorch wheel (e.g. torch-2.13.0+cpu), the build takes it
rather than asking the PyTorch index.

    python3 containers/pip_build_flags.py CONF_FILE TORCH_VERSION TORCH_VARIANT
    python3 containers/pip_build_flags.py build/container-pip.conf 2.13.0 cpu
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

LINE = re.compile(r"^(?P<origin>[^.]*)\.(?P<key>[\w-]+)='(?P<value>.*)'$")
PATH_KEYS = {"cert", "client-cert", "constraint", "requirement"}
LOCATION_KEYS = {"find-links", "index-url", "extra-index-url"}
NOT_FOR_THE_BUILD = {"user", "target", "prefix", "root", "src", "cache-dir", "log"}


def host_settings() -> dict[str, str]:
    """pip's effective settings here; environment variables win over files, as in pip itself."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    from_files: dict[str, str] = {}
    from_environment: dict[str, str] = {}
    for line in listed.splitlines():
        match = LINE.match(line.strip())
        if match is None or match["key"] in NOT_FOR_THE_BUILD:
            continue
        target = from_environment if match["origin"] == ":env:" else from_files
        target[match["key"]] = match["value"]
    return {**from_files, **from_environment}


def local_paths(key: str, value: str) -> list[Path]:
    paths = []
    for item in value.split():
        if key in PATH_KEYS:
            paths.append(Path(item))
        elif key in LOCATION_KEYS:
            parsed = urlparse(item)
            if parsed.scheme == "file":
                # A file:// "simple" index links its files relative to itself (../../files/…).
                paths.append(Path(unquote(parsed.path)).parent)
            elif not parsed.scheme:
                paths.append(Path(item))
    return [path for path in paths if path.exists()]


def has_local_torch(settings: dict[str, str], version: str, variant: str) -> bool:
    folders = local_paths("find-links", settings.get("find-links", ""))
    return any(any(folder.glob(f"torch-{version}+{variant}-*.whl")) for folder in folders if folder.is_dir())


def main(conf_file: str, torch_version: str, torch_variant: str) -> None:
    settings = host_settings()
    if not settings:
        return
    conf = Path(conf_file)
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        "[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()), encoding="utf-8"
    )
    mounts = {conf.resolve(): Path("/etc/pip.conf")}
    for key, value in settings.items():
        mounts.update({path.resolve(): path.resolve() for path in local_paths(key, value)})
    flags = [f"--volume {source}:{target}:ro" for source, target in mounts.items()]
    if has_local_torch(settings, torch_version, torch_variant):
        flags.append("--build-arg TORCH_INDEX_URL=")
    print(" ".join(flags))


if __name__ == "__main__":
    main(*sys.argv[1:4])
