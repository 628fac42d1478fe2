"""The `rlhf` command line. User mistakes end in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rlhf_components.core.config import ModelStep
from rlhf_components.core.errors import UserError
from rlhf_components.core.runtime import setup_logging
from rlhf_pipelines.config import load_pipeline_config
from rlhf_pipelines.interrupts import Interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RLHF pipelines on Kubeflow + MLflow.")
demo_assets_app = typer.Typer(no_args_is_help=True, help="The demo task's assets.")
app.add_typer(demo_assets_app, name="demo-assets")
console = Console()
log = logging.getLogger("rlhf")

INTERRUPTED_EXIT_CODE = 130  # what a shell reports for a command stopped by Ctrl-C

ConfigArg = Annotated[Path, typer.Argument(help="pipeline config YAML")]


class Runner(StrEnum):
    subprocess = "subprocess"
    docker = "docker"


@app.command()
def validate(config: ConfigArg) -> None:
    """Check a pipeline config without running anything."""
    loaded = load_pipeline_config(config)
    console.print(f"{config}: valid (pipeline {loaded.name}, config hash {loaded.config_hash()})")


@app.command("compile")
def compile_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the KFP IR YAML")],
    pipeline: Annotated[str | None, typer.Option(help="which DAG (default: the config's, else rlhf)")] = None,
    config: Annotated[
        Path | None, typer.Option(help="a pipeline config: its DAG, and its `resources` for the tasks' pods")
    ] = None,
) -> None:
    """Compile a pipeline to KFP IR YAML."""
    from rlhf_pipelines.runner import compile_pipeline

    loaded = load_pipeline_config(config) if config else None
    chosen = pipeline or (loaded.pipeline if loaded else "rlhf")
    console.print(f"compiled {chosen} to {compile_pipeline(chosen, output, loaded)}")


@app.command()
def run(
    config: ConfigArg,
    workdir: Annotated[Path, typer.Option(help="kfp.local outputs and summary.json go here")] = Path("."),
    runner: Annotated[
        Runner,
        typer.Option(
            help="subprocess: each step a process of this Python environment; docker: each step a container "
            "of the project image (RLHF_IMAGE, `make images`) through a Docker engine or podman's socket"
        ),
    ] = Runner.subprocess,
) -> None:
    """Run the pipeline locally (kfp.local, the same DAG as on Kubernetes) and print its summary."""
    from rlhf_pipelines.runner import run_local, summary_table

    loaded = load_pipeline_config(config)
    summary = run_local(loaded, workdir.resolve(), runner.value)
    summary_path = workdir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = Table(title=f"{loaded.name}: pipeline summary")
    table.add_column("metric")
    table.add_column("value")
    for key, value in summary_table(summary):
        table.add_row(key, escape(value))
    console.print(table)
    console.print(f"summary written to {summary_path}")


@app.command()
def submit(
    config: ConfigArg,
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80")],
    experiment: Annotated[str, typer.Option(help="KFP experiment")] = "rlhf",
) -> None:
    """Submit one run of the pipeline to a KFP endpoint."""
    from rlhf_pipelines.runner import submit as submit_run

    run_id = submit_run(load_pipeline_config(config), host, experiment)
    console.print(f"submitted run {run_id} to {host}")


@app.command()
def schedule(
    config: ConfigArg,
    host: Annotated[str, typer.Option(help="KFP API endpoint")],
    cron: Annotated[str, typer.Option(help="6-field KFP cron, seconds first, e.g. '0 0 3 * * 1'")],
    experiment: Annotated[str, typer.Option(help="KFP experiment, created if missing")] = "rlhf",
) -> None:
    """Schedule recurring retraining (a KFP recurring run)."""
    from rlhf_pipelines.runner import schedule as schedule_run

    recurring_id = schedule_run(load_pipeline_config(config), host, cron, experiment)
    console.print(f"scheduled recurring run {recurring_id} on {host}")


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="model version")],
    to: Annotated[str, typer.Option("--to", help="staging or production")] = "production",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
) -> None:
    """Point a stage alias at a model version."""
    from rlhf_components.register_and_promote.registry import promote as promote_version

    _use_tracking(tracking_uri)
    promote_version(model, version, to)
    console.print(f"{model} version {version} is now @{to}")


@app.command()
def rollback(
    model: Annotated[str, typer.Argument(help="registered model name")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
) -> None:
    """Move `production` back to the version that held it before."""
    from rlhf_components.register_and_promote.registry import rollback as rollback_model

    _use_tracking(tracking_uri)
    current, previous = rollback_model(model)
    console.print(f"{model}: production moved from version {current} back to {previous}")


@app.command("serve-reward-model")
def serve_reward_model(
    model: Annotated[str, typer.Argument(help="a reward model: directory, s3:// or models:/name@alias")],
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0: every interface)")] = "127.0.0.1",
    batch_size: Annotated[int, typer.Option(min=1, help="answers scored per forward pass")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    chat_template: Annotated[str, typer.Option(help="auto, none or a Jinja file")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="run the checkpoint's own code")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (models:/ only)")] = None,
) -> None:
    """Serve a reward model over HTTP: POST /v1/score {prompts, responses} → {scores}."""
    from rlhf_components.core.config import validate_mapping
    from rlhf_components.core.reward_server import serve

    if model.startswith("models:/"):
        _use_tracking(tracking_uri)
    settings = {"device": device, "chat_template": chat_template, "trust_remote_code": trust_remote_code}
    serve(model, validate_mapping(ModelStep, settings, "serve-reward-model"), host, port, batch_size)


@demo_assets_app.command("build")
def demo_assets_build(
    directory: Annotated[Path, typer.Option("--dir", help="where to build")] = Path(".rlhf-demo"),
    seed: Annotated[int, typer.Option(help="the demo task's seed")] = 0,
    force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False,
) -> None:
    """Build the demo task: corpus, tokenizer, tiny SFT GPT-2, prompts (cached by spec)."""
    from rlhf_components.demo import DemoAssetsSpec, build_demo_assets

    assets = build_demo_assets(directory, DemoAssetsSpec(seed=seed), force=force)
    console.print(f"demo assets in {assets.root} (SFT policy {assets.sft_model_dir})")


def _use_tracking(uri: str | None) -> None:
    import mlflow

    from rlhf_components.core.tracking import TrackingConfig, check_reachable, resolve_tracking_uri

    resolved = resolve_tracking_uri(TrackingConfig(uri=uri))
    check_reachable(resolved)
    mlflow.set_tracking_uri(resolved)


def main() -> None:
    setup_logging()
    try:
        # Out of standalone mode typer answers Ctrl-C with its exit code (130) instead of raising.
        code = app(standalone_mode=False)
    except Interrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = INTERRUPTED_EXIT_CODE
    except Exception as error:  # click's usage errors arrive here as ClickException
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise
    if code == INTERRUPTED_EXIT_CODE:
        print("interrupted", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)
