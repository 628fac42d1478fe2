"""Feedback ingestion at scale: 100,000 records in every shape (pairs, a/b choices with ties, Likert ratings,
rankings) and 2% malformed ones, over 10 JSONL files and one Parquet file, through `ingest_feedback`. Reports
records/s and peak memory for the first ingestion and for a rerun that finds every file already in the
ledger. Prints JSON; never a test.

    .venv/bin/python benchmarks/feedback.py -o benchmarks/results/feedback.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result

RECORDS = 100_000
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


def write_inbox(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    labels = root / "labels"
    labels.mkdir(parents=True)
    rows = [record(rng, i) for i in range(RECORDS)]
    parquet_rows = [r for r in rows[: RECORDS // 10] if isinstance(r, dict) and "rating" in r]
    json_rows = [r for r in rows[: RECORDS // 10] if r not in parquet_rows] + rows[RECORDS // 10 :]
    pq.write_table(pa.Table.from_pylist(parquet_rows), labels / "ratings.parquet")
    for part in range(10):
        chunk = json_rows[part::10]
        text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in chunk)
        (labels / f"part-{part}.jsonl").write_text(text + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()

    from rlhf_components import ingest_feedback
    from rlhf_components.core.runtime import setup_logging
    from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run

    setup_logging("WARNING")
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        write_inbox(root / "inbox")
        tracking = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="feedback")
        uri, parent = start_pipeline_run(tracking, "feedback", {}, {})
        context = RunContext(tracking_uri=uri, experiment="feedback", parent_run_id=parent, output_root=temp)
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
                    "records_per_second": outputs.counts["read"] / seconds
                    if outputs.counts["read"]
                    else None,
                    "dataset_judgements_per_second": outputs.counts["judgements"] / seconds,
                    "counts": outputs.counts,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
            )
    write_result(args.output, {"records": RECORDS, "runs": runs, **machine()})


if __name__ == "__main__":
    main()
