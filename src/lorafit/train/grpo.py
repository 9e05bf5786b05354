"""``task.type = "grpo"``: Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath), online
reinforcement learning from a reward.

Each row is a prompt (as for causal_lm: ``data.instruction`` and the instruction/input fields, or chat messages
in ``data.messages_field``, a last assistant turn there being the reference), optionally with a reference
(``data.output_field``) that a reward function may compare with. Each step, the model as it is (eval mode: no
dropout) samples ``task.num_generations`` completions of every prompt (``task.temperature``, at most
``task.max_new_tokens`` tokens, up to and with the end-of-sequence token); the reward (lorafit.train.rewards)
scores each; a completion's advantage is its reward minus its group's mean, over the group's standard
deviation (+ 1e-4; not with ``task.scale_rewards = false``). The loss of a completion is the mean over its
tokens (``task.grpo_loss = "grpo"``; ``"dr_grpo"``: their sum over ``task.max_new_tokens``, Dr. GRPO's
constant) of

    -A exp(log p - sg(log p)) + β (exp(r - log p) - (r - log p) - 1)

with ``log p`` the token's log-probability under the model, ``sg`` stop-gradient, ``r`` the reference model's
(the base, the adapter switched off) and ``β = task.grpo_beta`` (0, TRL's default, runs no reference model).
The first term's gradient is ``-A ∇ log p``: one update per batch of samples, so GRPO's clipped ratio is 1 and
its clip never acts. A step's loss is the mean over its completions.

Evaluation samples one completion of each prompt (the run's seed, its own random stream, so every evaluation
draws alike and training's draws are untouched) and reports the mean reward (``reward``, the default
``train.metric``) and the mean completion length in tokens.
"""

from __future__ import annotations

import json

import torch
from torch import nn

import lorafit
from lorafit.chat import render
from lorafit.train.data import rows_at
from lorafit.train.distributed import SINGLE, Distributed, unwrap
from lorafit.train.rewards import build_scorer
from lorafit.train.tasks import CausalLM, columns_to_rows


class GRPO(CausalLM):
    metric = "reward"
    skipped_because = "the prompt leaves no room for task.max_new_tokens within"

    def __init__(self, config, tokenizer, labels=None) -> None:
        super().__init__(config, tokenizer, labels)
        self._scorer = None  # loaded at the first reward: a run's model is a second model in memory
        self._log = [0.0, 0.0, 0]  # rewards, completion tokens and completions since train_log was read
        self._tokens = 0  # the last loss_sum's: its prompts, each as often as it was sampled, and completions

    def cache_key(self, kind: str) -> tuple:
        return (*super().cache_key(kind), self.config.data.output_field)

    def scorer(self):
        if self._scorer is None:
            t = self.config.task
            self._scorer = build_scorer(t.reward_model, t.reward_label, t.reward_function)
        return self._scorer

    def prompt_and_reference(self, row: dict) -> tuple[list[dict], str | None]:
        d = self.config.data
        if d.messages_field:
            messages = [{"role": m["role"], "content": str(m["content"])} for m in row[d.messages_field]]
            if messages and messages[-1]["role"] == "assistant":
                return messages[:-1], messages[-1]["content"]
            return messages, None
        reference = row.get(d.output_field) if d.output_field else None
        return [{"role": "user", "content": self._prompt_text(row)}], None if reference is None else str(reference)

    def encode_batch(self, batch: dict[str, list], split: str) -> dict[str, list]:
        """Each row's prompt, rendered up to where the assistant's turn starts, its messages (for the reward) and
        its reference; rows whose prompt leaves fewer than task.max_new_tokens of task.max_length are left out."""
        t = self.config.task
        rows = [self.prompt_and_reference(row) for row in columns_to_rows(batch)]
        prompts, references = [p for p, _ in rows], [r for _, r in rows]
        ids = self._ids_many([render(self.tok, p, generation_prompt=True) for p in prompts])
        out: dict[str, list] = {"input_ids": [], "prompt_messages": [], "reference": [], "length": []}
        for prompt, reference, x in zip(prompts, references, ids):
            if len(x) + t.max_new_tokens > t.max_length:
                continue
            out["input_ids"].append(x)
            out["prompt_messages"].append(json.dumps(prompt))
            out["reference"].append(None if reference is None else [reference])
            out["length"].append(len(x))
        return out

    def collate(self, feats: list[dict]) -> dict:
        """Left-padded prompts (generation continues them), their messages and references; a unit is a
        completion."""
        return {"input_ids": self._pad([f["input_ids"] for f in feats], self.pad_id, left=True),
                "attention_mask": self._pad([[1] * len(f["input_ids"]) for f in feats], 0, left=True),
                "prompts": [json.loads(f["prompt_messages"]) for f in feats],
                "references": [f["reference"][0] if f.get("reference") else None for f in feats],
                "units": torch.tensor(len(feats) * self.config.task.num_generations)}

    # -- training ---------------------------------------------------------------------
    def loss_sum(self, model, batch) -> torch.Tensor:
        t = self.config.task
        policy = unwrap(model)
        seqs, mask, completions = self.sample(policy, batch, t.num_generations)
        rewards = self._rewards(batch, completions, t.num_generations)
        advantages = group_advantages(rewards, t.num_generations, t.scale_rewards)
        completion_tokens = int(mask.sum())
        self._log[0] += float(rewards.sum())
        self._log[1] += completion_tokens
        self._log[2] += len(completions)
        prompt_mask = batch["attention_mask"].repeat_interleave(t.num_generations, dim=0)
        self._tokens = int(prompt_mask.sum()) + completion_tokens
        logp = self.completion_logps(model, seqs, prompt_mask, mask.shape[1])
        per_token = -advantages.to(logp.device)[:, None] * torch.exp(logp - logp.detach())
        if t.grpo_beta:
            with torch.no_grad(), lorafit.disabled(policy):
                reference = self.completion_logps(policy, seqs, prompt_mask, mask.shape[1])
            diff = reference - logp
            per_token = per_token + t.grpo_beta * (torch.exp(diff) - diff - 1)
        # per completion, its tokens' mean (grpo) or their sum over the longest a completion may be (dr_grpo)
        length = mask.sum(1, keepdim=True).clamp(min=1) if t.grpo_loss == "grpo" else t.max_new_tokens
        return (per_token * mask / length).sum()

    def trained_tokens(self, counted: int) -> int:
        return self._tokens

    def train_log(self) -> dict[str, tuple[float, float]]:
        """The mean reward and completion length of the training samples since the last call, as (sum, count)
        pairs (the loop sums them over the processes)."""
        rewards, tokens, n = self._log
        self._log = [0.0, 0.0, 0]
        return {"reward": (rewards, n), "completion_length": (tokens, n)}

    @torch.no_grad()
    def sample(self, model: nn.Module, batch: dict, per_prompt: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``per_prompt`` completions of every prompt of ``batch`` (the model in eval mode: no dropout), as the
        whole sequences (prompt + completion, each prompt repeated ``per_prompt`` times in a row), the
        completion tokens' mask (up to and with the first end-of-sequence token) and the completions' texts."""
        t = self.config.task
        training = model.training
        model.eval()
        try:
            seqs = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  do_sample=True, temperature=t.temperature, top_k=0, top_p=1.0,
                                  num_return_sequences=per_prompt, max_new_tokens=t.max_new_tokens,
                                  pad_token_id=self.pad_id, eos_token_id=self.tok.eos_token_id, use_cache=True)
        finally:
            model.train(training)
        completion = seqs[:, batch["input_ids"].shape[1]:]
        if self.tok.eos_token_id is None:  # nothing ends a completion early
            mask = torch.ones_like(completion, dtype=torch.float32)
        else:
            ends = completion == self.tok.eos_token_id
            mask = ((ends.cumsum(1) - ends.long()) == 0).to(torch.float32)  # through the first end token
        texts = self.tok.batch_decode(completion.masked_fill(mask == 0, self.pad_id), skip_special_tokens=True)
        return seqs, mask, [text.strip() for text in texts]

    def completion_logps(self, model: nn.Module, seqs: torch.Tensor, prompt_mask: torch.Tensor,
                         width: int) -> torch.Tensor:
        """Each completion token's log-probability (float32), rows x ``width`` (the completions' part of
        ``seqs``); ``prompt_mask`` marks the prompts' real tokens, whose left padding is masked and skipped in the
        positions, as generation saw them. The tokens after a completion's end see only what precedes them, and
        carry no loss."""
        attention = torch.cat([prompt_mask, prompt_mask.new_ones(seqs.shape[0], width)], dim=1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=seqs, attention_mask=attention, position_ids=positions, use_cache=False,
                       logits_to_keep=width + 1).logits[:, :-1]
        return -nn.functional.cross_entropy(logits.float().transpose(1, 2), seqs[:, -width:], reduction="none")

    def _rewards(self, batch: dict, completions: list[str], per_prompt: int) -> torch.Tensor:
        prompts = [p for p in batch["prompts"] for _ in range(per_prompt)]
        references = [r for r in batch["references"] for _ in range(per_prompt)]
        return torch.tensor(self.scorer()(prompts, completions, references), dtype=torch.float32)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, model, features, device, batch_size, autocast, dist: Distributed = SINGLE) -> dict[str, float]:
        model.eval()
        total, tokens, n = 0.0, 0.0, 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.config.train.seed)
            for idx in self._eval_batches(features, batch_size, dist, device):
                batch = self.collate(rows_at(features, idx or [0]))
                batch.update({k: batch[k].to(device) for k in ("input_ids", "attention_mask")})
                with autocast():
                    _, mask, completions = self.sample(unwrap(model), batch, 1)
                if idx is None:
                    continue
                total += float(self._rewards(batch, completions, 1).sum())
                tokens += float(mask.sum())
                n += len(completions)
        total, tokens, n = dist.all_reduce_sum([total, tokens, n], device)
        return {"reward": total / max(n, 1), "completion_length": tokens / max(n, 1)}


def group_advantages(rewards: torch.Tensor, per_prompt: int, scale: bool) -> torch.Tensor:
    """Each completion's reward minus its group's mean (the completions of one prompt, ``per_prompt`` in a row),
    over the group's standard deviation + 1e-4 where ``scale``."""
    groups = rewards.view(-1, per_prompt)
    centred = groups - groups.mean(1, keepdim=True)
    return (centred / (groups.std(1, keepdim=True) + 1e-4) if scale else centred).flatten()
