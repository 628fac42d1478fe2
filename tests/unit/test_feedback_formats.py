"""Every feedback shape and file type ingest_feedback reads, and the agreement statistics, against values
worked out by hand here."""

from __future__ import annotations

import csv
import io
import json
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from rlhf_components import ingest_feedback
from rlhf_components.core.records import Message, Preference
from rlhf_components.core.tracking import RunContext
from rlhf_components.ingest_feedback.formats import (
    Invalid,
    Limits,
    PairJudgement,
    RatingJudgement,
    judgements,
    records,
)
from rlhf_components.ingest_feedback.quality import (
    Agreement,
    AgreementTally,
    Coincidences,
    decide,
    pairs_from_ratings,
)

from ._helpers import P, read_jsonl, write_feedback_in_every_format, write_jsonl


def judged(raw: dict[str, Any], rating_range: tuple[float, float] = (1, 5)) -> list[Any]:
    found, capped = judgements(raw, "here", {}, Limits(rating_range))
    assert capped == 0
    return found


def preferred(found: list[Any]) -> set[tuple[str, str]]:
    """(better, worse) of each pair judgement, whatever text order it is stored in."""
    return {(j.response_a, j.response_b) if j.choice == "a" else (j.response_b, j.response_a) for j in found}


def test_pairwise_shapes_agree_on_what_was_preferred() -> None:
    chosen_rejected = judged({"prompt": P, "chosen": "yes", "rejected": "no", "annotator": "ann"})
    a_b = judged({"prompt": P, "response_a": "no", "response_b": "yes", "choice": "b", "annotator": "ann"})
    assert chosen_rejected == a_b  # one pair, one key: the texts are stored in order, the choice follows
    assert preferred(chosen_rejected) == {("yes", "no")}
    [tie] = judged({"prompt": P, "response_a": "no", "response_b": "yes", "choice": "tie"})
    assert tie.choice == "tie" and tie.annotator == "unknown"
    extra = judged({"prompt": P, "chosen": "yes", "rejected": "no", "id": 7, "timestamp": "2026-01-01"})
    assert preferred(extra) == {("yes", "no")}  # other tools' extra fields are ignored


def test_a_ranking_becomes_every_pair_in_its_order() -> None:
    found = judged({"prompt": P, "responses": ["w", "x", "y", "z"], "ranking": [2, 0, 3, 1]})
    assert len(found) == 4 * 3 // 2
    order = ["y", "w", "z", "x"]
    assert preferred(found) == set(combinations(order, 2))


def test_hh_rlhf_conversations_split_at_the_last_assistant_turn() -> None:
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Review the diner?\n\nAssistant:"
    [found] = judged({"chosen": shared + " It was lovely.", "rejected": shared + " No."})
    assert found.prompt == [
        Message(role="user", content="Hi"),
        Message(role="assistant", content="Hello!"),
        Message(role="user", content="Review the diner?"),
    ]
    assert preferred([found]) == {("It was lovely.", "No.")}
    with pytest.raises(Invalid) as raised:
        judged({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"})
    assert raised.value.code == "bad_conversation"


def test_trl_conversational_preferences_are_pairs_of_their_assistant_answers() -> None:
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review the diner?"}]
    explicit = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Lovely."}],
        "rejected": [{"role": "assistant", "content": "Bad."}],
    }
    implicit = {
        "prompt": prompt,
        "chosen": [*prompt, {"role": "assistant", "content": "Lovely."}],
        "rejected": [*prompt, {"role": "assistant", "content": "Bad."}],
    }
    for raw in (explicit, implicit):
        [found] = judged(raw)
        assert found.prompt == [Message(**m) for m in prompt]
        assert preferred([found]) == {("Lovely.", "Bad.")}
    with pytest.raises(Invalid) as raised:
        judged({**explicit, "chosen": [{"role": "user", "content": "Lovely."}]})
    assert raised.value.code == "bad_value" and "assistant" in str(raised.value)
    # A conversation in a CSV cell is its JSON text.
    table = io.StringIO()
    writer = csv.DictWriter(table, list(explicit))
    writer.writeheader()
    writer.writerow({key: json.dumps(value) for key, value in explicit.items()})
    [(_, record)] = list(records("feedback.csv", io.BytesIO(table.getvalue().encode())))
    assert isinstance(record, dict) and judged(record)[0].prompt == [Message(**m) for m in prompt]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ({"prompt": P, "chosen": "same", "rejected": " same "}, "self_pair"),
        ({"prompt": [{"role": "user", "content": " "}], "chosen": "yes", "rejected": "no"}, "empty_text"),
        ({"prompt": [{"role": "user"}], "chosen": "yes", "rejected": "no"}, "missing_field"),
        ({"prompt": P, "chosen": "", "rejected": "no"}, "empty_text"),
        ({"prompt": " ", "chosen": "yes", "rejected": "no"}, "empty_text"),
        ({"prompt": P, "response": "ok", "rating": 6, "annotator": "a"}, "rating_out_of_range"),
        ({"prompt": P, "response": "ok", "rating": 3}, "missing_field"),
        ({"prompt": P, "responses": ["a", "b"], "ranking": [0, 0]}, "bad_ranking"),
        ({"prompt": P, "responses": ["a", "a"], "ranking": [0, 1]}, "self_pair"),
        ({"prompt": P, "response_a": "a", "response_b": "b", "choice": "c"}, "bad_value"),
        ({"task_id": "nope", "choice": "a"}, "unknown_task"),
        ({"text": "hello"}, "unknown_format"),
        (["a", "b"], "not_an_object"),
    ],
)
def test_bad_records_are_refused_with_a_reason_code(raw: Any, code: str) -> None:
    with pytest.raises(Invalid) as raised:
        judged(raw)
    assert raised.value.code == code


def test_ratings_pair_up_within_one_annotator_by_their_difference() -> None:
    def rating(response: str, value: float, annotator: str = "ann") -> RatingJudgement:
        return RatingJudgement(
            prompt=P, response=response, rating=value, annotator=annotator, sources=[response]
        )

    ratings = [rating("a", 5), rating("b", 4.5), rating("c", 2), rating("d", 2), rating("e", 1, "other")]
    pairs, _ = pairs_from_ratings(ratings, min_difference=1.0, max_pairs=1000)
    # a–b differ by 0.5 (< 1: no pair); c–d are equal (a tie); e is another annotator's scale.
    expected = {("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")}
    assert preferred([p for p in pairs if p.choice != "tie"]) == expected
    [tie] = [p for p in pairs if p.choice == "tie"]
    assert {tie.response_a, tie.response_b} == {"c", "d"} and tie.sources == ["c", "d"]


def by_pair(votes: list[PairJudgement]) -> dict[tuple[str, str, str], list[PairJudgement]]:
    """Votes grouped by pair, as the JudgementIndex hands them out (prompts here are text)."""
    groups: dict[tuple[str, str, str], list[PairJudgement]] = {}
    for vote in votes:
        groups.setdefault((str(vote.prompt), vote.response_a, vote.response_b), []).append(vote)
    return groups


def preferences(votes: list[PairJudgement], tie_policy: str) -> tuple[list[Preference], int]:
    decided = [decide(key, group, tie_policy) for key, group in sorted(by_pair(votes).items())]  # type: ignore[arg-type]
    return [p for p in decided if p is not None], sum(p is None for p in decided)


def agreement(votes: list[PairJudgement]) -> Agreement:
    tally = AgreementTally()
    for group in by_pair(votes).values():
        tally.add(group)
    return tally.result()


def krippendorff_alpha_nominal(units: list[list[str]]) -> float | None:
    coincidences = Coincidences()
    for labels in units:
        coincidences.add(labels)
    return coincidences.alpha()


def test_majority_votes_and_the_tie_policy() -> None:
    def vote(choice: str, annotator: str, prompt: str = P) -> PairJudgement:
        return PairJudgement(
            prompt=prompt,
            response_a="no",
            response_b="yes",
            choice=choice,  # type: ignore[arg-type]
            annotator=annotator,
            sources=[annotator],
        )

    votes = [
        vote("b", "x"),
        vote("b", "y"),
        vote("a", "z"),
        vote("a", "x", "Q2"),
        vote("b", "y", "Q2"),
        vote("tie", "x", "Q3"),
    ]
    kept, dropped = preferences(votes, "drop")
    assert dropped == 2
    [majority] = kept
    assert (majority.chosen, majority.rejected, majority.votes) == ("yes", "no", 3)
    assert majority.annotators == ["x", "y", "z"] and majority.sources == ["x", "y", "z"]
    coin, dropped = preferences(votes, "coin")
    assert dropped == 0 and len(coin) == 3
    assert preferences(votes, "coin") == (coin, 0)  # the coin is seeded by the pair: the same every run


def reference_alpha(units: list[list[str]]) -> float:
    """Krippendorff's α for nominal labels from its pairwise definition, written independently of the
    coincidence matrix: α = 1 − (n − 1)·Σ_u Σ_{i≠j} [c_ui ≠ c_uj]/(m_u − 1) / Σ_{c≠k} n_c·n_k."""
    pairable = [u for u in units if len(u) > 1]
    values = [label for u in pairable for label in u]
    n = len(values)
    observed = sum(
        sum(1 for i in range(len(u)) for j in range(len(u)) if i != j and u[i] != u[j]) / (len(u) - 1)
        for u in pairable
    )
    expected = sum(1 for i in range(n) for j in range(n) if i != j and values[i] != values[j])
    return 1 - (n - 1) * observed / expected


def test_krippendorff_alpha_matches_its_definition_and_known_cases() -> None:
    units = [["a", "a", "b"], ["b", "b"], ["a", "tie", "a", "a"], ["tie", "tie"], ["a"], ["b", "a"]]
    assert krippendorff_alpha_nominal(units) == pytest.approx(reference_alpha(units), abs=1e-12)
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    # Systematic disagreement on two labels used equally: α = 1 − D_o/D_e = 1 − 1/(4/6) = −0.5.
    assert krippendorff_alpha_nominal([["a", "b"], ["b", "a"]]) == pytest.approx(-0.5)
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]) is None  # no expected disagreement
    assert krippendorff_alpha_nominal([["a"]]) is None


def test_agreement_per_annotator() -> None:
    def vote(choice: str, annotator: str, prompt: str) -> PairJudgement:
        return PairJudgement(
            prompt=prompt,
            response_a="no",
            response_b="yes",
            choice=choice,  # type: ignore[arg-type]
            annotator=annotator,
            sources=["s"],
        )

    votes = [
        vote("a", "x", "1"),
        vote("a", "y", "1"),
        vote("b", "z", "1"),
        vote("tie", "x", "2"),
        vote("tie", "y", "2"),
        vote("a", "x", "3"),
    ]
    result = agreement(votes)
    assert result.shared_pairs == 2
    assert result.raw_agreement == pytest.approx(2 / 4)  # (x,y) (x,z) (y,z) on 1; (x,y) on 2
    assert result.krippendorff_alpha == pytest.approx(reference_alpha([["a", "a", "b"], ["tie", "tie"]]))
    assert result.annotators["x"].judgements == 3 and result.annotators["x"].ties == 1
    assert result.annotators["x"].agrees_with_others == pytest.approx(2 / 3)
    assert result.annotators["z"].agrees_with_others == 0.0


def test_every_file_type_reads_to_the_records_written(tmp_path: Path) -> None:
    assert write_feedback_in_every_format(tmp_path) == 8
    found = {}
    for path in sorted(tmp_path.iterdir()):
        with path.open("rb") as handle:
            found.update(records(str(path), handle))
    assert len(found) == 8  # the cancelled annotation and the unannotated task are not records
    assert found[f"{tmp_path}/ratings.csv:2"] == {
        "prompt": P,
        "response": "meh",
        "rating": 2.0,
        "annotator": "j",
    }
    assert found[f"{tmp_path}/ratings.csv:3"]["ranking"] == [1, 0, 2]
    assert found[f"{tmp_path}/choices.parquet#row2"]["choice"] == "tie"
    assert found[f"{tmp_path}/export.json#task0/annotation0"] == {
        "choice": "b",
        "annotator": "label-studio:m@x.org",
        "prompt": "S",
        "response_a": "u",
        "response_b": "v",
    }
    assert found[f"{tmp_path}/export.json#task1/annotation0"]["annotator"] == "label-studio:3"


def test_a_mixed_inbox_ingests_every_format(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "labels").mkdir(parents=True)
    total = write_feedback_in_every_format(inbox / "labels")
    outputs = ingest_feedback.run(
        ingest_feedback.Config(eval_fraction=0.0), ingest_feedback.Inputs(inbox=str(inbox)), run_context
    )
    assert outputs.counts["read"] == total and outputs.counts["quarantined"] == 0
    pairs = {(p["prompt"], p["chosen"], p["rejected"]) for p in read_jsonl(outputs.train)}
    assert pairs == {
        (P, "yes", "no"),
        (P, "fine", "meh"),  # ratings 4 and 2 by j, one from JSONL and one from CSV
        ("Q", "b", "a"),
        ("Q", "b", "c"),
        ("Q", "a", "c"),  # the ranking
        ("R", "x", "y"),  # one vote for x and one tie: x wins
        ("S", "v", "u"),  # one vote for v and one tie (Label Studio): v wins
    }


def test_label_studio_round_trip_joins_judgements_to_their_candidates(
    tmp_path: Path, run_context: RunContext
) -> None:
    """Tasks exported for Label Studio, labelled with the choices of the config we ship, and exported back."""
    import xml.etree.ElementTree as ElementTree

    from rlhf_components.core.records import AnnotationTask
    from rlhf_components.generate_candidates.step import LABEL_STUDIO_CONFIG, label_studio_json

    values = [c.attrib["value"] for c in ElementTree.fromstring(LABEL_STUDIO_CONFIG).iter("Choice")]
    assert values == ["A", "B", "Tie"]
    tasks = [
        AnnotationTask(
            task_id=f"t{i}",
            prompt_id=f"p{i}",
            prompt=f"{P} {i}",
            response_a_id="x",
            response_a=f"first {i}",
            response_b_id="y",
            response_b=f"second {i}",
        )
        for i in range(3)
    ]
    inbox = tmp_path / "inbox"
    write_jsonl(inbox / "tasks" / "run.jsonl", [t.model_dump() for t in tasks])
    export = json.loads(label_studio_json(tasks))
    for item, value in zip(export, values, strict=True):
        item["annotations"] = [
            {
                "completed_by": 1,
                "result": [
                    {
                        "from_name": "choice",
                        "to_name": "prompt",
                        "type": "choices",
                        "value": {"choices": [value]},
                    }
                ],
            }
        ]
    (inbox / "labels").mkdir()
    (inbox / "labels" / "export.json").write_text(json.dumps(export))
    outputs = ingest_feedback.run(
        ingest_feedback.Config(eval_fraction=0.0), ingest_feedback.Inputs(inbox=str(inbox)), run_context
    )
    pairs = {(p["prompt"], p["chosen"], p["rejected"]) for p in read_jsonl(outputs.train)}
    assert pairs == {(f"{P} 0", "first 0", "second 0"), (f"{P} 1", "second 1", "first 1")}
    assert outputs.counts["ties_dropped"] == 1 and outputs.counts["quarantined"] == 0
