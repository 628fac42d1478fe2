"""`rlhf run --runner docker`: every step of the DAG in the project image, through kfp.local's DockerRunner,
against a Docker engine or podman's Docker-compatible socket.

What kfp.local's DockerRunner does not do, and a local run needs:
- the work folder, the current folder and every local path of the config are bind-mounted at the same
  paths (kfp mounts only the pipeline root), so storage_root, the inbox, mlflow.db and mlruns/ are shared;
- the containers run as the host user, so what they write stays the user's, and share the host's network
  (servers on 127.0.0.1 stay reachable) and process table (a step sees `rlhf run` vanish and stops);
- kfp 2.17 starts containers with auto_remove=True; podman then removes a failed container before its
  exit code is read, and kfp reports the task SUCCESS (or crashes with "no such container"). Containers
  are kept until their exit code is read, then removed;
- an interrupted run stops its running container's processes with SIGINT (they mark their MLflow runs
  KILLED), then removes the container.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_pipelines.config import PipelineConfig
from rlhf_pipelines.interrupts import GRACE_S

# Where podman's Docker-compatible service listens (`podman system service --time=0`), root and rootless.
PODMAN_SOCKETS = (
    "/run/podman/podman.sock",
    f"{os.environ.get('XDG_RUNTIME_DIR', '/nonexistent')}/podman/podman.sock",
)


def engine_host() -> dict[str, str]:
    """DOCKER_HOST for the run: the user's, else Docker's own socket, else podman's."""
    if os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists():
        return {}
    for socket in PODMAN_SOCKETS:
        if Path(socket).exists():
            return {"DOCKER_HOST": f"unix://{socket}"}
    return {}


def check_engine_and_image(image: str) -> None:
    """One line, before any step starts, when the engine is unreachable or the image is not built."""
    import docker
    from docker.errors import DockerException, ImageNotFound

    where = os.environ.get("DOCKER_HOST", "the default Docker socket")
    try:
        client = docker.from_env()
    except DockerException as error:
        raise UserError(
            f"--runner docker: no container engine answers at {where} ({error}); start one, e.g. "
            "`podman system service --time=0 &` (root: DOCKER_HOST=unix:///run/podman/podman.sock)"
        ) from None
    try:
        client.images.get(image)
    except ImageNotFound:
        raise UserError(
            f"--runner docker: image {image} is not there; build it with `make images` "
            "or name another with RLHF_IMAGE"
        ) from None
    finally:
        client.close()


def folders_to_share(config: PipelineConfig, also: list[Path]) -> list[Path]:
    """The host folders the steps read and write: `also`; the folders the run writes (storage_root, the
    feedback inbox, the sqlite store's folder), created; the folder of every other existing local path of
    the (absolute) config; none inside another."""
    tracking = config.tracking.uri or ""
    written = [config.storage_root, config.feedback_inbox or ""]
    written += (
        [str(Path(tracking.removeprefix("sqlite:///")).parent)] if tracking.startswith("sqlite:///") else []
    )
    wanted = {folder.resolve() for folder in also}
    for location in written:
        if Path(location).is_absolute():
            Path(location).mkdir(parents=True, exist_ok=True)
            wanted.add(Path(location).resolve())
    for location in _strings(config.model_dump(mode="json")):
        path = Path(location)
        if path.is_absolute() and path.exists():
            wanted.add((path if path.is_dir() else path.parent).resolve())
    if Path("/") in wanted:
        raise UserError("--runner docker: cannot share the host's / with the containers; run from a folder")
    return sorted(path for path in wanted if not any(other in path.parents for other in wanted))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _strings(item)


def docker_runner(config: PipelineConfig, workdir: Path, environment: dict[str, str]) -> Any:
    """The steps see the work folder, the current one (mlflow.db, mlruns/), the model cache and the
    config's local paths at the host's paths, and write as the host user."""
    import kfp.local
    from docker.types import Mount

    cache = storage.cache_dir()
    folders = folders_to_share(config, [workdir, Path.cwd(), cache])
    environment = {**environment, "RLHF_CACHE_DIR": str(cache)}
    return kfp.local.DockerRunner(
        mounts=[Mount(target=str(folder), source=str(folder), type="bind") for folder in folders],
        user=f"{os.getuid()}:{os.getgid()}",
        working_dir=str(Path.cwd()),
        network_mode="host",
        pid_mode="host",
        environment=environment,
    )


@contextmanager
def exit_codes_kept() -> Iterator[None]:
    """kfp.local's DockerTaskHandler runs its containers through `_run_container` for the length of a run."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = _run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def _run_container(
    client: Any, image: str, command: list[str], volumes: dict[str, Any], **run_args: Any
) -> int:
    """kfp's run_docker_container, with the container kept until its exit code is read."""
    container = client.containers.run(
        image=image, command=command, detach=True, stdout=True, stderr=True, volumes=volumes, **run_args
    )
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        status_code: int = container.wait()["StatusCode"]
        return status_code
    except BaseException:
        _interrupt(container)
        raise
    finally:
        with suppress(Exception):
            container.remove(force=True)


def _interrupt(container: Any) -> None:
    """SIGINT to every process of the container (host pids: it shares the host's process table), as
    Ctrl-C would reach a step process of the subprocess runner; what is left after GRACE_S is killed."""
    with suppress(Exception):
        container.reload()
        if container.status != "running":
            return
        top = container.top(ps_args="-eo pid")
        for row in top.get("Processes") or []:
            with suppress(ProcessLookupError, ValueError, PermissionError):
                os.kill(int(row[0]), signal.SIGINT)
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            container.reload()
            if container.status != "running":
                return
            time.sleep(0.5)
        container.kill()
