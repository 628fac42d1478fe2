"""Every loss and estimator the trainers use, as pure functions of tensors and plain numbers.

Shapes: B rows (episodes or preference pairs), T response tokens. A `mask` is 1.0 on valid response tokens
and 0.0 on padding; every mean over tokens is taken over valid tokens only. Nothing here reads a config,
holds state (but `KLController`'s β) or knows about models, so each function is checked against its formula
on fixed inputs in tests/unit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

# The element-wise sum over distributed workers (`Workers.sum`); the identity when training alone.
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _alone(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, T] over the valid tokens of `mask` [B, T]: a scalar."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce = _alone
) -> torch.Tensor:
    """`values` [B, T] scaled to unit variance over valid tokens, 0 on padding; [B, T].

    With `shift_mean` the mean becomes 0 too; without it the sign of rewards is kept. The statistics are
    sums passed through `reduce`, so with workers they are those of every worker's rows together.
    """
    count = reduce(mask.sum()).clamp(min=1)
    mean = reduce((values * mask).sum()) / count
    variance = reduce((((values - mean) * mask) ** 2).sum()) / count
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each distribution [..., V] given its log-probabilities; [...]."""
    return -(log_probs.exp() * log_probs).sum(-1)


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"]
) -> torch.Tensor:
    """Per-token estimates of KL(π‖π_ref) from tokens sampled from π, [B, T] from two [B, T] log-probs:
    k1 = log r, k3 = (r⁻¹ − 1) + log r, with r = π/π_ref (k3 is never negative)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: (advantages, returns), each [B, T].

    A_t = Σ_k (γλ)^k δ_{t+k} with δ_t = r_t + γ·V_{t+1} − V_t; the value after the last valid token is 0.
    Returns are A + V. `rewards`, `values` and `mask` are [B, T].
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: (masked mean of max(−A·r, −A·clip(r, 1±ε)) as a scalar, the ratio
    r = π/π_old [B, T], the indicator of tokens where the clipped term won [B, T]). Inputs are [B, T]."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.maximum(unclipped, clipped), mask), ratio, (clipped > unclipped).float()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss: (½ · masked mean of the larger of (V − R)² and (V_clipped − R)², with
    V_clipped = V_old + clip(V − V_old, ±ε), as a scalar; the indicator of clipped tokens [B, T])."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange, cliprange)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, (clipped_error > unclipped_error).float()


class KLController:
    """β of the KL penalty, fixed or adapted toward a target KL (Ziegler et al. 2019).

    Adaptive: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/H) after each rollout of n episodes, horizon H.
    """

    def __init__(self, kl_coef: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.value = kl_coef
        self.adaptive = adaptive
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, episodes: int) -> None:
        if self.adaptive:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * episodes / self.horizon


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0, center_coef: float = 0.0
) -> torch.Tensor:
    """Reward-model loss from the scores [B] of the chosen and rejected answers: a scalar,
    −log σ(r_c − r_r − margin) averaged, plus center_coef · mean((r_c + r_r)²) to keep rewards near 0."""
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center_coef > 0.0:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family losses from summed response log-probs [B] of the policy and the reference:
    (loss per pair [B], implicit reward β·(log π − log π_ref) of the chosen [B], of the rejected [B]).

    With h = (log π_c − log π_ref,c) − (log π_r − log π_ref,r) and ε = label_smoothing:
    sigmoid −(1−ε)·log σ(β·h) − ε·log σ(−β·h)  (DPO; ε > 0: conservative DPO)
    robust  (−(1−ε)·log σ(β·h) + ε·log σ(−β·h)) / (1 − 2ε)  (unbiased under label noise ε)
    hinge   max(0, 1 − β·h)  (SLiC)
    ipo     (h − 1/(2β))²  (IPO)
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        loss = (
            -(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
        ) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def group_advantages(rewards: torch.Tensor, group_size: int, method: str, scale: bool) -> torch.Tensor:
    """Critic-free advantages of rewards [G·K], K consecutive answers to each of G prompts; [G·K].

    grpo  A_i = r_i − mean(group), divided by (std(group) + 1e-4) with `scale` (std with Bessel's
          correction, as in the GRPO paper's code)
    rloo  A_i = r_i − mean of the other K − 1 answers' rewards (REINFORCE leave-one-out)
    """
    groups = rewards.view(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    if method == "rloo":
        return ((groups - mean) * group_size / (group_size - 1)).reshape(-1)
    if method != "grpo":
        raise ValueError(f"unknown advantage {method!r}")
    centred = groups - mean
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def clipped_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate per token for sequence advantages [B]: (−min(r·A, clip(r, 1 − ε_low,
    1 + ε_high)·A) [B, T], the ratio r = π/π_old [B, T])."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages[:, None]
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    return -torch.minimum(ratio * advantage, clipped * advantage), ratio


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_tokens: int) -> torch.Tensor:
    """A batch's loss from per-token losses [B, T] over valid tokens: a scalar.

    token     Σ loss / Σ tokens: every token weighs the same (DAPO)
    sequence  mean over answers of each answer's mean token loss (the GRPO paper)
    dr_grpo   Σ loss / (B · max_tokens): a constant normaliser, no length bias (Dr. GRPO)
    """
    if mode == "token":
        return masked_mean(per_token, mask)
    if mode == "sequence":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if mode == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}")
