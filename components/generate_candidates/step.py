"""Sample K candidate answers per prompt and export them as pairwise annotation tasks.

Tasks go to the feedback inbox as JSONL and as Label Studio task JSON; candidate ids are content hashes,
so judgements that come back later join to the candidates they are about.
"""

from __future__ import annotations

import hashlib
import json
import logging
from itertools import combinations

import torch
from tqdm import tqdm

from rlhf_components.core import storage
from rlhf_components.core.chat import encode_prompts
from rlhf_components.core.generation import decode_responses, sample_prompts
from rlhf_components.core.models import load_policy
from rlhf_components.core.records import AnnotationTask, Candidate, prompt_text
from rlhf_components.core.runtime import progress_disabled, seed_everything, seeded_generator, select_device
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.generate_candidates.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)


def candidate_id(prompt_id: str, response: str) -> str:
    return hashlib.sha256(f"{prompt_id}\x00{response}".encode()).hexdigest()[:16]


def pairwise_tasks(candidates: list[Candidate]) -> list[AnnotationTask]:
    """Every pair of distinct, non-empty answers to the same prompt becomes one task."""
    by_prompt: dict[str, dict[str, Candidate]] = {}
    for candidate in candidates:
        if not candidate.response.strip():
            continue
        by_prompt.setdefault(candidate.prompt_id, {}).setdefault(candidate.id, candidate)
    tasks = []
    for prompt_id, unique in by_prompt.items():
        for a, b in combinations(sorted(unique.values(), key=lambda c: c.id), 2):
            tasks.append(
                AnnotationTask(
                    task_id=hashlib.sha256(f"{a.id}:{b.id}".encode()).hexdigest()[:16],
                    prompt_id=prompt_id,
                    prompt=a.prompt,
                    response_a_id=a.id,
                    response_a=a.response,
                    response_b_id=b.id,
                    response_b=b.response,
                )
            )
    return tasks


# The Label Studio labelling config for these tasks: its choices are what ingest_feedback reads back from an
# export (A, B or Tie), and `task_id` in each task's data joins the judgement to its candidates.
LABEL_STUDIO_CONFIG = """<View>
  <Header value="Which response is better?"/>
  <Text name="prompt" value="$prompt"/>
  <Text name="response_a" value="$response_a"/>
  <Text name="response_b" value="$response_b"/>
  <Choices name="choice" toName="prompt" choice="single" required="true">
    <Choice value="A"/>
    <Choice value="B"/>
    <Choice value="Tie"/>
  </Choices>
</View>
"""


def label_studio_json(tasks: list[AnnotationTask]) -> str:
    """Label Studio tasks: the prompt as annotators read it (a conversation's turns as `Role: content`)."""
    return json.dumps(
        [
            {"id": index, "data": {**task.model_dump(), "prompt": prompt_text(task.prompt)}}
            for index, task in enumerate(tasks, 1)
        ],
        indent=1,
    )


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, "generate_candidates", config):
        device = select_device(config.device, "generate_candidates")
        seed_everything(context.seed)
        generator = seeded_generator(context.seed, device)
        model, fmt = load_policy(inputs.policy, config, device)
        model.eval()
        prompts = encode_prompts(
            fmt,
            inputs.prompts,
            config.max_prompt_tokens,
            "generate_candidates",
            "prompts to generate from",
            first=config.max_prompts,
        )
        candidates: list[Candidate] = []
        repeated = [p for p in prompts for _ in range(config.samples_per_prompt)]
        for start in tqdm(
            range(0, len(repeated), config.batch_size),
            desc="generate_candidates",
            disable=progress_disabled(),
        ):
            chunk = repeated[start : start + config.batch_size]
            with torch.inference_mode():
                batch = sample_prompts(model, fmt, [ids for _, ids in chunk], config.sampling, generator)
            texts = decode_responses(fmt, batch)
            ended, lengths = batch.ended_with_eos.tolist(), batch.response_mask.sum(-1).tolist()
            for offset, ((prompt, _), text) in enumerate(zip(chunk, texts, strict=True)):
                candidates.append(
                    Candidate(
                        id=candidate_id(prompt.id, text),
                        prompt_id=prompt.id,
                        prompt=prompt.prompt,
                        response=text,
                        ended_with_eos=ended[offset],
                        num_tokens=lengths[offset],
                        policy=inputs.policy,
                        sample_index=(start + offset) % config.samples_per_prompt,
                    )
                )
        tasks = pairwise_tasks(candidates)
        run_key = context.parent_run_id
        outputs = Outputs(
            candidates=step_output(context, "generate_candidates", "candidates.jsonl"),
            tasks=storage.join(inputs.inbox, "tasks", f"{run_key}.jsonl"),
            label_studio_tasks=storage.join(inputs.inbox, "tasks", f"{run_key}.labelstudio.json"),
            label_studio_config=storage.join(inputs.inbox, "tasks", "labelstudio-config.xml"),
            num_candidates=len(candidates),
            num_tasks=len(tasks),
        )
        storage.write_jsonl(outputs.candidates, [c.model_dump() for c in candidates])
        storage.write_text(outputs.label_studio_tasks, label_studio_json(tasks))
        storage.write_text(outputs.label_studio_config, LABEL_STUDIO_CONFIG)
        storage.write_jsonl(outputs.tasks, [t.model_dump() for t in tasks])
        log_metrics(
            {
                "candidates": len(candidates),
                "annotation_tasks": len(tasks),
                "candidate_eos_rate": sum(c.ended_with_eos for c in candidates) / len(candidates),
                "candidate_mean_tokens": sum(c.num_tokens for c in candidates) / len(candidates),
            }
        )
        log.info("generate_candidates: %d candidates, %d annotation tasks", len(candidates), len(tasks))
        return outputs
