"""The `ppo` stage: RL from the SFT model, PPO against the reward model (RLHF) or GRPO.

    python -m llmpipe.alignment.ppo --config configs/tiny.yaml [--set ppo.advantage=grpo --set ppo.reward=checker]

A rollout batch is `rollout_prompts` prompts with `samples_per_prompt` responses each, sampled
with the KV cache (temperature, top-p, up to `max_new_tokens`), every response by a generator
seeded by (seed, rollout, prompt, sample): the same responses on any number of ranks. Each rank
samples and scores the responses of its share of the prompts (whole groups); the scored
responses are then gathered on every rank, which computes the advantages over the whole batch
and trains on its slice, as every loader slices its data.

Scores: `reward: model`, the reward model's score at the last token, minus `truncation_penalty`
for a response cut off before its <|end|>; `reward: checker`, 1 when the task's checker accepts
the reply, else 0. Per response token: the log-probs of the policy that sampled it (old), of the
reference (SFT) and, with GAE, the critic's values.

  * `advantage: gae` (PPO, InstructGPT's RLHF): per-token reward -kl_coef * k1 (logp - ref_logp)
    plus the score on the last token; GAE(gamma, lambda); advantages whitened over the batch;
    loss = clipped policy loss + vf_coef * clipped value loss. Policy (from SFT) and critic (from
    the reward model, its score head the value head) are one module, `ActorCritic`, that the
    trainer parallelizes, checkpoints and steps as one model.
  * `advantage: grpo`: no critic; a response's advantage is its score minus its group's mean,
    divided by the group's std unless `scale_rewards` is off; loss = clipped policy loss +
    grpo_kl_coef * the k3 estimate of KL(policy || reference).

A trainer step is one optimizer step over batch_tokens / model.seq_len responses. The train
loader is the rollout buffer: it samples a new batch when the last has served `epochs` passes,
and its state, the buffer included, is in every checkpoint, so a run killed mid-rollout resumes
exactly. The reference and the reward model are frozen, in the trainer's layout.

At the end: the policy's release weights (what chat and export read) and, on the held-out
prompts, greedy answers of SFT and of the policy: their mean reward-model score, their task
accuracy, and the policy's KL to SFT along its answers (exact, summed over each answer's tokens).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from llmpipe.alignment import rl
from llmpipe.alignment.answers import model_scores, reply_text
from llmpipe.alignment.checker import check
from llmpipe.alignment.data import Prompt, RowCounts, load_prompts
from llmpipe.alignment.render import (
    ChatEncoder,
    completion_batch,
    left_padded,
    token_logps,
)
from llmpipe.config import ModelSection, PPOSection
from llmpipe.context import StageContext, as_paths
from llmpipe.data.loader import RowLoader, derive_seed
from llmpipe.distributed import env
from llmpipe.errors import BadValue
from llmpipe.model.generate import generate
from llmpipe.model.model import Transformer, flops_per_token
from llmpipe.model.release import WEIGHTS, load_release
from llmpipe.tokenizer.special import PAD_ID
from llmpipe.tokenizer.train import load_tokenizer
from llmpipe.tracking import NullTracker, Tracker
from llmpipe.training.trainer import Trainer, TrainTask, autocast

PER_TOKEN = ("old_logp", "ref_logp", "values", "advantages", "returns")  # per response token, in a rollout row


class ActorCritic(nn.Module):
    """PPO's policy (a language model) and critic (a score model: a value per position), trained as one model."""

    def __init__(self, cfg: ModelSection):
        super().__init__()
        self.policy = Transformer(cfg, head="lm")
        self.critic = Transformer(cfg, head="score")

    def init_weights(self) -> None:
        self.policy.init_weights()
        self.critic.init_weights()

    def forward(self, idx: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(idx, **kwargs), self.critic(idx, **kwargs)  # (B, T, V), (B, T)


# --- sampling and scoring ---------------------------------------------------------------------------


def sample_responses(model: Transformer, prompts: list[list[int]], seeds: list[int], cfg: PPOSection, stop_id: int,
                     temperature: float | None = None) -> list[list[int]]:
    """Each prompt's response: its ids up to and including `stop_id`, or `max_new_tokens` ids
    when cut off. Row i samples with a generator seeded by seeds[i] (temperature 0: greedy)."""
    device = model.tok_emb.weight.device
    temperature = cfg.temperature if temperature is None else temperature
    responses = []
    for start in range(0, len(prompts), cfg.generation_batch_size):
        ids, mask = left_padded(prompts[start:start + cfg.generation_batch_size], device)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds[start:start + len(ids)]]
        new = generate(model, ids, cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                       generator=generators, stop_id=stop_id, pad_id=PAD_ID, prompt_mask=mask)
        for row in new.tolist():
            responses.append(row[:row.index(stop_id) + 1] if stop_id in row else row)
    model.train()  # generate leaves it in eval mode; the trained model's own module may be this one
    return responses


def _response_values(values: torch.Tensor, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    """Per-position values (B, W) of a `completion_batch` -> each response token's, as lists."""
    rows = values.float().cpu()
    return [rows[i, len(p) - 1:len(p) - 1 + len(r)].tolist() for i, (p, r) in enumerate(pairs)]


@torch.no_grad()
def response_logps(model: nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> list[list[float]]:
    """Log-prob of each response token under `model`, given its prompt."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = completion_batch(chunk)
        device = next(model.parameters()).device
        logps = token_logps(model(batch["input_ids"].to(device)), batch["targets"].to(device))
        out += _response_values(logps, chunk)
    return out


@torch.no_grad()
def response_values(critic: nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> list[list[float]]:
    """The critic's value at each response token's input position (the state it was sampled in)."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids = completion_batch(chunk)["input_ids"].to(next(critic.parameters()).device)
        out += _response_values(critic(ids), chunk)
    return out


def checker_scores(encoder: ChatEncoder, prompts: list[Prompt], responses: list[list[int]]) -> list[float]:
    """1.0 where the task checker accepts the decoded reply, else 0.0."""
    return [float(check(p.task, reply_text(encoder, r), p.answer)) for p, r in zip(prompts, responses)]


# --- advantages --------------------------------------------------------------------------------------


def _padded(rows: list[dict], key: str, width: int) -> torch.Tensor:
    return torch.tensor([r[key] + [0.0] * (width - len(r[key])) for r in rows], dtype=torch.float32)


def add_advantages(rows: list[dict], cfg: PPOSection) -> None:
    """Advantages and returns of every response token of the whole rollout batch, in place."""
    width = max(len(r["response"]) for r in rows)
    mask = torch.tensor([[True] * len(r["response"]) + [False] * (width - len(r["response"])) for r in rows])
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
    if cfg.advantage == "gae":
        kl = rl.kl_estimators(_padded(rows, "old_logp", width), _padded(rows, "ref_logp", width))["k1"]
        values = _padded(rows, "values", width)
        advantages, returns = rl.gae(rl.token_rewards(rewards, kl, mask, cfg.kl_coef), values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = rl.whiten(advantages, mask)
    else:
        advantages = rl.group_advantages(rewards, cfg.samples_per_prompt, cfg.scale_rewards)[:, None] * mask
        returns = torch.zeros_like(advantages)
    for row, adv, ret in zip(rows, advantages.tolist(), returns.tolist()):
        n = len(row["response"])
        row["advantages"], row["returns"] = adv[:n], ret[:n]


def rollout_stats(rows: list[dict]) -> dict[str, float]:
    """What is logged of a rollout batch: scores, KL to the reference, lengths."""
    scores = torch.tensor([r["score"] for r in rows], dtype=torch.float64)
    k = [rl.kl_estimators(torch.tensor(r["old_logp"]), torch.tensor(r["ref_logp"])) for r in rows]
    return {"score_mean": float(scores.mean()), "score_std": float(scores.std()) if len(rows) > 1 else 0.0,
            "reward_mean": sum(r["reward"] for r in rows) / len(rows),
            "kl_k1": sum(float(e["k1"].sum()) for e in k) / len(rows),
            "kl_k3": sum(float(e["k3"].sum()) for e in k) / len(rows),
            "response_length": sum(len(r["response"]) for r in rows) / len(rows),
            "truncated": sum(r["truncated"] for r in rows) / len(rows)}


# --- the rollout buffer (the train loader) ----------------------------------------------------------


def collate_rollouts(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rollout rows -> a right-padded batch: `input_ids`, `targets` (the response tokens, -1
    elsewhere) and each per-token quantity at its token's input position (0 elsewhere)."""
    pairs = [(r["prompt"], r["response"]) for r in rows]
    batch = completion_batch(pairs)
    width = batch["input_ids"].shape[1]
    for key in PER_TOKEN:
        if key in rows[0]:
            aligned = torch.zeros(len(rows), width)
            for i, (row, (prompt, _)) in enumerate(zip(rows, pairs)):
                aligned[i, len(prompt) - 1:len(prompt) - 1 + len(row[key])] = torch.tensor(row[key])
            batch[key] = aligned
    return batch


class RolloutBuffer:
    """PPO's train loader: micro-batches of scored responses, `epochs` passes over each rollout
    batch in a seeded order, then the next batch from `make_rollout(index, prompts)`. The prompts
    come in a seeded global order, epoch after epoch. The state (JSON) holds the buffer itself."""

    def __init__(self, prompts: list[Prompt], make_rollout: Callable[[int, list[Prompt]], list[dict]], *,
                 rollout_prompts: int, epochs: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.make_rollout, self.epochs, self.seed = make_rollout, epochs, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.prompt_order = RowLoader(prompts, rollout_prompts, list, seed=seed)
        self.rollout = 0  # rollout batches made so far
        self.rows: list[dict] | None = None
        self.served = 0  # rows of the current batch served (all ranks)
        self.loader: RowLoader | None = None

    def _row_loader(self) -> RowLoader:
        return RowLoader(self.rows, self.batch_size, collate_rollouts, seed=derive_seed(self.seed, self.rollout),
                         rank=self.rank, world_size=self.world_size)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.rows is None or self.served >= self.epochs * len(self.rows):
            self.rows = self.make_rollout(self.rollout, self.prompt_order.next_items())
            self.rollout += 1
            self.loader, self.served = self._row_loader(), 0
        self.served += self.batch_size * self.world_size
        return self.loader.next_batch()

    def rewind(self) -> None:
        raise NotImplementedError("the rollout buffer is a train loader only")

    def state_dict(self) -> dict:
        return {"rollout": self.rollout, "served": self.served, "prompts": self.prompt_order.state_dict(),
                "rows": self.rows, "rows_position": self.loader.state_dict() if self.loader else None}

    def load_state_dict(self, state: dict) -> None:
        self.prompt_order.load_state_dict(state["prompts"])
        self.rollout, self.served, self.rows = state["rollout"], state["served"], state["rows"]
        self.loader = None
        if self.rows is not None:
            self.loader = self._row_loader()
            self.loader.load_state_dict(state["rows_position"])


# --- step functions -----------------------------------------------------------------------------------


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution (B, T) from logits (B, T, V)."""
    logp = logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def ppo_step_fn(cfg: PPOSection):
    """The loss of one micro-batch of scored responses: the clipped policy loss plus, with GAE,
    vf_coef times the clipped value loss of the critic, or, with GRPO, grpo_kl_coef times the
    k3 KL to the reference; averaged over the micro-batch's response tokens."""

    def step(forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        targets = batch["targets"]
        mask = (targets != -1).float()
        if cfg.advantage == "gae":
            logits, values = forward(batch["input_ids"])
        else:
            logits, values = forward(batch["input_ids"]), None
        logp = token_logps(logits, targets)
        loss, metrics = rl.clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip)
        metrics = {"policy_loss": loss.detach(), **metrics,
                   "entropy": rl.masked_mean(token_entropy(logits.detach()), mask)}
        if values is not None:
            value_loss = rl.clipped_value_loss(values.float(), batch["values"], batch["returns"], mask, cfg.value_clip)
            loss = loss + cfg.vf_coef * value_loss
            metrics.update(value_loss=value_loss.detach(),
                           explained_variance=rl.explained_variance(values.detach().float(), batch["returns"], mask))
        else:
            kl = rl.masked_mean(rl.kl_estimators(logp, batch["ref_logp"])["k3"], mask)
            if cfg.grpo_kl_coef:
                loss = loss + cfg.grpo_kl_coef * kl
            metrics["kl_k3"] = kl.detach()
        return loss, metrics

    return step


# --- the stage ----------------------------------------------------------------------------------------


class Rollouts:
    """Makes scored rollout batches with the trainer's current policy (`make(index, prompts)`),
    timing generation and scoring, logging each batch's statistics."""

    def __init__(self, trainer: Trainer, cfg: PPOSection, encoder: ChatEncoder, reference: nn.Module,
                 reward_model: nn.Module, seed: int, tracker: Tracker, steps_per_rollout: int):
        self.trainer, self.cfg, self.encoder, self.seed = trainer, cfg, encoder, seed
        self.reference, self.reward_model, self.tracker = reference, reward_model, tracker
        self.steps_per_rollout = steps_per_rollout
        self.generation_s = self.scoring_s = 0.0
        self.last_stats: dict[str, float] = {}
        self._cycle_start: float | None = None
        self._last_generation_s = 0.0

    def make(self, index: int, prompts: list[Prompt]) -> list[dict]:
        cfg, trainer, G = self.cfg, self.trainer, self.cfg.samples_per_prompt
        dp, rank = trainer.dp_size, trainer.dp_rank
        now = time.perf_counter()
        mine = [(j, s, p) for j, p in enumerate(prompts) if j % dp == rank for s in range(G)]  # whole groups
        prompt_ids = [self.encoder.prompt(p.prompt) for _, _, p in mine]
        t0 = time.perf_counter()
        with autocast(trainer.device, trainer.autocast_dtype):
            policy = trainer.rollout_model("policy" if cfg.advantage == "gae" else None)
            responses = sample_responses(policy, prompt_ids, [derive_seed(self.seed, index, j, s) for j, s, _ in mine],
                                         cfg, self.encoder.end)
            t1 = time.perf_counter()
            pairs = list(zip(prompt_ids, responses))
            bs = cfg.generation_batch_size
            trained = trainer.submodel()
            old_logp = response_logps(trained.policy if cfg.advantage == "gae" else trained, pairs, bs)
            ref_logp = response_logps(self.reference, pairs, bs)
            values = response_values(trained.critic, pairs, bs) if cfg.advantage == "gae" else None
            if cfg.reward == "model":
                scores = model_scores(self.reward_model, pairs, bs)
            else:
                scores = checker_scores(self.encoder, [p for _, _, p in mine], responses)
        rows = []
        for n, ((j, s, _), (prompt, response)) in enumerate(zip(mine, pairs)):
            truncated = self.encoder.end not in response
            penalty = cfg.truncation_penalty if truncated and cfg.reward == "model" else 0.0
            row = {"prompt_index": j, "sample": s, "prompt": prompt, "response": response, "truncated": truncated,
                   "score": scores[n], "reward": scores[n] - penalty, "old_logp": old_logp[n], "ref_logp": ref_logp[n]}
            if values is not None:
                row["values"] = values[n]
            rows.append(row)
        t2 = time.perf_counter()
        rows = sorted((r for part in env.all_gather_object(rows) for r in part),
                      key=lambda r: (r["prompt_index"], r["sample"]))
        add_advantages(rows, cfg)
        self.generation_s += t1 - t0
        self.scoring_s += t2 - t1
        stats = {**rollout_stats(rows), "generation_s": t1 - t0, "scoring_s": t2 - t1}
        if self._cycle_start is not None:  # the share of the last rollout's cycle spent generating
            stats["generation_share"] = self._last_generation_s / (now - self._cycle_start)
        self._cycle_start, self._last_generation_s = now, t1 - t0
        self.last_stats = stats
        self.tracker.log_metrics({f"rollout/{k}": v for k, v in stats.items()}, step=index * self.steps_per_rollout)
        if trainer.env.is_main:
            print(f"rollout {index:4d} score {stats['score_mean']:.4f} (std {stats['score_std']:.3f}) kl_k1 "
                  f"{stats['kl_k1']:.3f} length {stats['response_length']:.1f} truncated {stats['truncated']:.0%} "
                  f"generation {t1 - t0:.2f}s scoring {t2 - t1:.2f}s", flush=True)
        return rows


def heldout_answers(policy: Transformer, sft: Transformer, reward_model: Transformer, encoder: ChatEncoder,
                    prompts: list[Prompt], cfg: PPOSection) -> dict:
    """Greedy answers of SFT and of the policy to held-out prompts: mean reward-model score,
    task accuracy (prompts with a task), the policy's KL to SFT along its answers, examples."""
    prompt_ids = [encoder.prompt(p.prompt) for p in prompts]
    seeds = [0] * len(prompts)
    result: dict = {}
    for name, model in (("sft", sft), ("ppo", policy)):
        responses = sample_responses(model, prompt_ids, seeds, cfg, encoder.end, temperature=0.0)
        model.eval()
        pairs = list(zip(prompt_ids, responses))
        scores = model_scores(reward_model, pairs, cfg.generation_batch_size)
        checked = [(p, r) for p, r in zip(prompts, responses) if p.task and p.answer is not None]
        accuracy = (sum(checker_scores(encoder, [p for p, _ in checked], [r for _, r in checked])) / len(checked)
                    if checked else math.nan)
        suffix = "" if name == "ppo" else "_sft"
        result[f"rm_score{suffix}"] = sum(scores) / len(scores)
        result[f"task_accuracy{suffix}"] = accuracy
        if name == "ppo":
            result["heldout_kl"] = sum(answer_kl(policy, sft, pairs, cfg.generation_batch_size)) / len(pairs)
            result["answer_examples"] = [
                {"prompt": p.prompt[-1]["content"], "reply": reply_text(encoder, r), "rm_score": s}
                for p, r, s in list(zip(prompts, responses, scores))[:5]]
    return result


@torch.no_grad()
def answer_kl(policy: Transformer, reference: Transformer, pairs: list[tuple[list[int], list[int]]],
              batch_size: int) -> list[float]:
    """KL(policy || reference) of the next-token distributions at each response token's position,
    summed over the response: exact, not sampled."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = completion_batch(chunk)
        logp = policy(batch["input_ids"]).float().log_softmax(-1)
        logq = reference(batch["input_ids"]).float().log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1) * (batch["targets"] != -1)  # (B, W)
        out += kl.sum(-1).tolist()
    return out


def usable_prompts(prompts: list[Prompt], encoder: ChatEncoder, cfg: PPOSection, seq_len: int,
                   counts: RowCounts) -> list[Prompt]:
    """Prompts whose response fits the context; with the checker reward, only prompts it can check."""
    kept = []
    for p in prompts:
        if len(encoder.prompt(p.prompt)) + cfg.max_new_tokens > seq_len:
            counts.skip(f"prompt + ppo.max_new_tokens={cfg.max_new_tokens} exceeds model.seq_len={seq_len}", p.source)
        elif cfg.reward == "checker" and (p.task is None or p.answer is None):
            counts.skip("no task and answer for ppo.reward=checker", p.source)
        else:
            kept.append(p)
    counts.require_rows(kept)
    return kept


def check_layout(cfg: PPOSection, rows_per_step: int, dp: int) -> None:
    G = cfg.samples_per_prompt
    if cfg.advantage == "grpo" and G < 2:
        raise BadValue(f"ppo.group_size={G}: GRPO compares the samples of a prompt; use 2 or more")
    if cfg.rollout_prompts % dp:
        raise BadValue(f"ppo.rollout_prompts={cfg.rollout_prompts} must be a multiple of the {dp} data-parallel ranks")
    if (cfg.rollout_prompts * G) % rows_per_step:
        raise BadValue(f"ppo.rollout_prompts * group_size = {cfg.rollout_prompts * G} responses must be a multiple "
                       f"of the {rows_per_step} responses of an optimizer step (ppo.batch_tokens / model.seq_len)")


def run_ppo(model_cfg: ModelSection, cfg: PPOSection, *, sft_dir: Path, reward_dir: Path, tokenizer_dir: Path,
            prompts: list[Path], heldout: list[Path], out_dir: Path, seed: int, tracker: Tracker | None = None,
            stop_after: int | None = None) -> dict:
    """Train the policy from SFT (`sft_dir`) against the reward model (`reward_dir`) into `out_dir`."""
    tracker, out_dir = tracker or NullTracker(), Path(out_dir)
    encoder = ChatEncoder(load_tokenizer(tokenizer_dir))
    counts, heldout_counts = RowCounts("ppo.data"), RowCounts("ppo.heldout_data")
    train_prompts = usable_prompts(load_prompts(prompts, counts), encoder, cfg, model_cfg.seq_len, counts)
    heldout_prompts = usable_prompts(load_prompts(heldout, heldout_counts), encoder, cfg, model_cfg.seq_len,
                                     heldout_counts)[:cfg.eval_prompts]
    if cfg.parallel.strategy in ("tp", "fsdp_tp", "pp"):
        raise BadValue(f"ppo.parallel.strategy={cfg.parallel.strategy} is not supported; use ddp, zero1, zero2 or fsdp")
    gae = cfg.advantage == "gae"
    if gae:
        trainer = Trainer(model_cfg, cfg, seed=seed, section="ppo", build=lambda: ActorCritic(model_cfg),
                          init_from={"policy": Path(sft_dir) / WEIGHTS, "critic": Path(reward_dir) / WEIGHTS})
    else:
        trainer = Trainer(model_cfg, cfg, seed=seed, section="ppo", init_from=Path(sft_dir) / WEIGHTS)
    rows_per_step = trainer.micro_batch_size * trainer.dp_size * trainer.accumulation
    check_layout(cfg, rows_per_step, trainer.dp_size)
    steps_per_rollout = cfg.epochs * cfg.rollout_prompts * cfg.samples_per_prompt // rows_per_step
    main = trainer.env.is_main
    reference = trainer.frozen(Path(sft_dir) / WEIGHTS)
    reward_model = trainer.frozen(Path(reward_dir) / WEIGHTS, head="score")
    rollouts = Rollouts(trainer, cfg, encoder, reference, reward_model, seed, tracker if main else NullTracker(),
                        steps_per_rollout)
    buffer = RolloutBuffer(train_prompts, rollouts.make, rollout_prompts=cfg.rollout_prompts, epochs=cfg.epochs,
                           batch_size=trainer.micro_batch_size, seed=seed, rank=trainer.dp_rank,
                           world_size=trainer.dp_size)
    # policy forward and backward per response token, plus the critic's with GAE (generation and scoring not counted)
    task = TrainTask("ppo", ppo_step_fn(cfg), buffer, flops_per_token=flops_per_token(model_cfg) * (1 + gae))
    config = {"model": model_cfg.model_dump(mode="json"), "ppo": cfg.model_dump(mode="json"), "seed": seed}
    state, result = trainer.resume_and_fit(task, out_dir, config, tracker, stop_after)
    del result["heldout_loss"]  # no held-out loss: the held-out numbers are the answers' below
    result.update(prompts=len(train_prompts), heldout_prompts=len(heldout_prompts), rollouts=buffer.rollout,
                  steps_per_rollout=steps_per_rollout,
                  data={"train": counts.to_manifest(), "heldout": heldout_counts.to_manifest()},
                  last_rollout={k: v for k, v in rollouts.last_stats.items() if not k.endswith(("_s", "_share"))})
    result["timing"].update(generation_s=rollouts.generation_s, scoring_s=rollouts.scoring_s,
                            generation_share=rollouts.generation_s / state.train_time_s if state.train_time_s else 0.0)
    if stop_after is not None and state.step < cfg.max_steps:
        return result
    trainer.save_release(out_dir, config, tracker, part="policy" if gae else None)
    if main and heldout_prompts:
        result.update(heldout_answers(load_release(out_dir), load_release(sft_dir), load_release(reward_dir), encoder,
                                      heldout_prompts, cfg))
    return result


def ppo_stage(ctx: StageContext, model_cfg: ModelSection, cfg: PPOSection) -> dict:
    """The registered stage: the SFT model (policy and reference), the reward model (reward and
    critic), the run's tokenizer and the prompts of `ppo.data` (default: the instruct stage's)."""
    return run_ppo(model_cfg, cfg, sft_dir=ctx.inputs["sft"], reward_dir=ctx.inputs["reward"],
                   tokenizer_dir=ctx.inputs["tokenizer"], prompts=as_paths(ctx.inputs["data"]),
                   heldout=as_paths(ctx.inputs["heldout"]), out_dir=ctx.out_dir, seed=ctx.seed, tracker=ctx.tracker)


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("ppo")
