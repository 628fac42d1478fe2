"""Which device a step runs on. This machine has no GPU: the CUDA branches are checked with torch.cuda's
answers replaced (what is visible, how many), never by running a kernel. That PPO keeps its tensors on its
models' device is checked in test_ppo_details.py, with the default device set to `meta`."""

from __future__ import annotations

import pytest
import torch

from rlhf_components import ppo
from rlhf_components.core.errors import UserError
from rlhf_components.core.runtime import sampling_generator, seeded_generator, select_device


def test_auto_is_the_cpu_when_no_gpu_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto", "ppo") == torch.device("cpu")
    assert select_device("cpu", "ppo") == torch.device("cpu")


@pytest.mark.parametrize("setting", ["cuda", "cuda:1"])
def test_asking_for_a_gpu_that_is_not_there_names_the_field(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=rf"^dpo\.device: {setting} was asked for, but this process sees no"):
        select_device(setting, "dpo")


@pytest.mark.parametrize(
    ("setting", "local_rank", "expected"),
    [("auto", "1", "cuda:1"), ("cuda", "1", "cuda:1"), ("cuda", None, "cuda:0"), ("cuda:0", "1", "cuda:0")],
)
def test_a_worker_takes_its_local_rank_gpu_unless_one_is_named(
    monkeypatch: pytest.MonkeyPatch, setting: str, local_rank: str | None, expected: str
) -> None:
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert select_device(setting, "ppo") == torch.device(expected)
    assert chosen == [torch.device(expected)]


def test_a_gpu_index_beyond_those_visible_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"^ppo\.device: cuda:2 does not exist \(2 visible\)"):
        select_device("cuda:2", "ppo")


def test_generators_are_reproducible_and_sampling_seeds_match_the_seeded_generator() -> None:
    first, second = seeded_generator(7), seeded_generator(7)
    assert torch.equal(torch.rand(5, generator=first), torch.rand(5, generator=second))
    assert seeded_generator(7, "cpu").device == torch.device("cpu")
    assert torch.equal(
        torch.rand(5, generator=sampling_generator(3, 1, 2)),
        torch.rand(5, generator=sampling_generator(3, 1, 2, torch.device("cpu"))),
    )


def test_a_checkpoint_resumes_on_another_device() -> None:
    on_gpu, on_cpu = ppo.Config(device="cuda"), ppo.Config(device="cpu")
    assert on_gpu.checkpoint_fingerprint() == on_cpu.checkpoint_fingerprint()
    assert ppo.Config(kl_coef=0.1).checkpoint_fingerprint() != ppo.Config().checkpoint_fingerprint()
