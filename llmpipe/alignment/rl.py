"""The arithmetic of RL on language models (PPO and GRPO), on per-token tensors of responses.

Shapes: B responses, T response tokens; `mask` (B, T) is True on a response's real tokens
(False on the padding after it). Log-probs are per token, of the sampled tokens.

Definitions as OpenRLHF, verl and TRL use them:
  * KL estimators of KL(policy || reference) from samples of the policy (Schulman, "Approximating
    KL divergence"), with log r = ref_logp - logp: k1 = -log r, k2 = (log r)^2 / 2,
    k3 = (r - 1) - log r (unbiased like k1, never negative);
  * GAE: delta_t = r_t + gamma V_{t+1} - V_t (V after the last token is 0), A_t = delta_t +
    gamma lambda A_{t+1}, returns = A + V;
  * PPO's clipped objectives: policy max(-A ratio, -A clip(ratio, 1 - c, 1 + c)); value
    0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2); both averaged over real tokens;
  * GRPO's group-relative advantage: (r - mean of its group) / (std of its group + eps).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (a scalar)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over the True entries of mask (Bessel's correction, as TRL)."""
    count = mask.sum()
    centered = (x - masked_mean(x, mask)) * mask
    return (centered ** 2).sum() / (count - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x scaled to unit variance over the real tokens, and centred unless `shift_mean` is False;
    0 on padding."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_estimators(logp: torch.Tensor, ref_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token k1, k2 and k3 estimates of KL(policy || reference) from the sampled tokens'
    log-probs under the policy and the reference."""
    log_ratio = ref_logp - logp  # log r, r = q / p
    return {"k1": -log_ratio, "k2": log_ratio ** 2 / 2, "k3": torch.expm1(log_ratio) - log_ratio}


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (B, T) by generalised advantage estimation; 0 on padding, and the
    value after a response's last real token counts as 0 (the episode ends there)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, averaged over real tokens; the share of tokens where the clip
    binds and the approximate KL(sampling policy || current) by k3 on the sampled tokens."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    metrics = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask),
               "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask)}
    return loss, {k: v.detach() for k, v in metrics.items()}


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss, averaged over real tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect critic, 0 a constant one."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * kl on every real token, plus each response's score
    (B,) on its last real token (InstructGPT's reward with a per-token KL penalty)."""
    rewards = -kl_coef * kl * mask
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(dim=1)  # (B,)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage of each of B = prompts x group_size responses (grouped consecutively):
    its reward minus its group's mean, divided by the group's std + eps unless `scale` is off
    (Dr. GRPO). A group whose rewards are all equal gets 0, not NaN."""
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the {rewards.shape[0]} rewards")
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)
