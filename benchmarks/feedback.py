"""Feedback ingestion and prompt collection at scale: `ingest_feedback` over N records in every shape (pairs,
a/b choices with ties, Likert ratings, rankings; 2% malformed) in 10 JSONL files and one Parquet file, then a
rerun that finds every file already in the ledger; `collect_prompts` over N prompts. Each size runs in a
fresh process, so its peak RSS is its own. Prints JSON; never a test.

    .venv/bin/python benchmarks/feedback.py --sizes 10000 100000 1000000 -o benchmarks/results/feedback.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result

ANNOTATORS = [f"annotator-{i}" for i in range(20)]


def record(rng: random.Random, index: int) -> dict[str, Any] | str:
    prompt = f"Review number {index // 4} of the diner:"
    answers = [f"answer {index // 4}-{k} {'good' if k % 2 else 'bad'}" for k in range(4)]
    annotator = rng.choice(ANNOTATORS)
    shape = rng.random()
    if shape < 0.02:
        return rng.choice(['{"prompt": "cut off', json.dumps({"prompt": prompt}), json.dumps([1, 2])])
    if shape < 0.45:
        return {"prompt": prompt, "chosen": answers[1], "rejected": answers[0], "annotator": annotator}
    if shape < 0.75:
        return {
            "prompt": prompt,
            "response_a": answers[2],
            "response_b": answers[3],
            "choice": rng.choice(["a", "b", "tie"]),
            "annotator": annotator,
        }
    if shape < 0.95:
        return {
            "prompt": prompt,
            "response": rng.choice(answers),
            "rating": rng.randint(1, 5),
            "annotator": annotator,
        }
    return {
        "prompt": prompt,
        "responses": answers[:3],
        "ranking": rng.sample(range(3), 3),
        "annotator": annotator,
    }


def write_inbox(root: Path, records: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    labels = root / "labels"
    labels.mkdir(parents=True)
    rows = [record(rng, i) for i in range(records)]
    parquet_rows = [r for r in rows[: records // 10] if isinstance(r, dict) and "rating" in r]
    json_rows = [r for r in rows[: records // 10] if r not in parquet_rows] + rows[records // 10 :]
    pq.write_table(pa.Table.from_pylist(parquet_rows), labels / "ratings.parquet")
    for part in range(10):
        chunk = json_rows[part::10]
        text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in chunk)
        (labels / f"part-{part}.jsonl").write_text(text + "\n", encoding="utf-8")


def write_prompts(root: Path, records: int) -> None:
    with (root / "prompts.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(records):
            handle.write(json.dumps({"prompt": f"Review number {i} of the diner downtown:"}) + "\n")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _context(root: Path, experiment: str) -> Any:
    from rlhf_components.core.runtime import setup_logging
    from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run

    setup_logging("WARNING")
    tracking = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment=experiment)
    uri, parent = start_pipeline_run(tracking, experiment, {}, {})
    return RunContext(tracking_uri=uri, experiment=experiment, parent_run_id=parent, output_root=str(root))


def measure_ingestion(root: Path) -> dict[str, Any]:
    """In this process, on the inbox under `root`: ingest it, then ingest it again."""
    from rlhf_components import ingest_feedback

    context = _context(root, "feedback")
    inputs = ingest_feedback.Inputs(inbox=str(root / "inbox"))
    runs = []
    for label in ("first ingestion", "rerun, every file already ingested"):
        started = time.perf_counter()
        outputs = ingest_feedback.run(ingest_feedback.Config(), inputs, context)
        seconds = time.perf_counter() - started
        runs.append(
            {
                "run": label,
                "seconds": seconds,
                "records_per_second": outputs.counts["read"] / seconds if outputs.counts["read"] else None,
                "counts": outputs.counts,
                "peak_rss_mb_so_far": _peak_rss_mb(),
            }
        )
    return {"step": "ingest_feedback", "runs": runs}


def measure_prompts(root: Path) -> dict[str, Any]:
    from rlhf_components import collect_prompts

    context = _context(root, "prompts")
    config = collect_prompts.Config(sources=[str(root / "prompts.jsonl")])
    started = time.perf_counter()
    outputs = collect_prompts.run(config, collect_prompts.Inputs(), context)
    seconds = time.perf_counter() - started
    return {
        "step": "collect_prompts",
        "seconds": seconds,
        "records_per_second": outputs.counts["read"] / seconds,
        "counts": outputs.counts,
        "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--prompt-sizes", type=int, nargs="*", default=[100_000])
    parser.add_argument("--prepare", nargs=3, metavar=("STEP", "N", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("STEP", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    if args.prepare:  # a process of its own: the generated records never count towards the step's memory
        step, size, folder = args.prepare
        (
            write_inbox(Path(folder) / "inbox", int(size))
            if step == "ingest_feedback"
            else write_prompts(Path(folder), int(size))
        )
        return
    if args.measure:
        step, folder = args.measure
        print(
            json.dumps(
                measure_ingestion(Path(folder))
                if step == "ingest_feedback"
                else measure_prompts(Path(folder))
            )
        )
        return
    results = []
    for step, sizes in (("ingest_feedback", args.sizes), ("collect_prompts", args.prompt_sizes)):
        for size in sizes:
            with tempfile.TemporaryDirectory() as folder:
                subprocess.run([sys.executable, __file__, "--prepare", step, str(size), folder], check=True)
                done = subprocess.run(
                    [sys.executable, __file__, "--measure", step, folder],
                    capture_output=True,
                    text=True,
                    check=True,
                )
            results.append({"records": size, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(json.dumps(results[-1]), file=sys.stderr)
    write_result(args.output, {"results": results, **machine()})


if __name__ == "__main__":
    main()
