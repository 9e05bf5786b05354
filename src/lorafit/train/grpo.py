"""``task.type = "grpo"``: Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath), online
reinforcement learning from a reward.

Each row is a prompt (as for causal_lm: ``data.instruction`` and the instruction/input fields, or chat messages
in ``data.messages_field``, a last assistant turn there being the reference), optionally with a reference
(``data.output_field``) that a reward function may compare with.

Before each batch's steps, the model as it is (eval mode: no dropout) samples ``task.num_generations``
completions of every prompt of every micro-batch (``task.temperature``, ``task.top_p``, ``task.top_k``, at
most ``task.max_new_tokens`` tokens, up to and with the end-of-sequence token); the rewards
(lorafit.train.rewards) score each. A completion's advantage is its reward minus its group's mean, divided by
the standard deviation (+ 1e-4) of its group's rewards (``task.scale_rewards = "group"``), of the step's
(``"batch"``), or by nothing (``"none"``). The model then takes ``task.num_iterations`` optimizer steps on
these samples; the loss of a completion token is

    -min(ρ A, clip(ρ, 1 - ε, 1 + ε_high) A) + β (exp(r - log p) - (r - log p) - 1)

with ``log p`` the token's log-probability under the model at the temperature, ``ρ = exp(log p - log p_old)``
its ratio to the model of the batch's first step (per token, or with ``task.importance_sampling_level =
"sequence"`` the exponent of the completion's mean log-ratio: GSPO; in the first term capped at
``task.grpo_delta`` where set: INTELLECT-2's two-sided clip), ``r`` the reference model's
log-probability (the base, the adapter switched off) and ``β = task.grpo_beta`` (0, TRL's default, runs no
reference model). On the first step ρ is 1 and its gradient is that of ``log p``: with one iteration (the
default) the clip never acts. The token losses add up per ``task.grpo_loss``: each completion's mean, summed
over the step's completions and divided by their count ("grpo"); each completion's sum over
``task.max_new_tokens`` ("dr_grpo"); each micro-batch's token mean, averaged over the micro-batches ("bnpo");
or the step's token sum over its token count ("dapo"). With ``task.mask_truncated_completions``, completions
that did not end carry no loss. Three more of TRL's losses change the first term too: "cispo" (MiniMax-M1)
``-sg(min(ρ, 1 + ε_high)) A log p``, whose gradient no token loses to the clip, added up as "dapo"; "sapo"
(soft adaptive policy optimization) ``-σ(τ (ρ - 1)) (4 / τ) A``, a smooth gate in place of the clip, with
``τ = task.sapo_temperature_pos`` where A > 0 and ``task.sapo_temperature_neg`` elsewhere, added up as "grpo";
"luspo" the clipped term summed over each completion's tokens (not averaged: length-unbiased GSPO), averaged
over the step's completions. With ``task.top_entropy_quantile`` ρ < 1, the first term counts only on the
tokens whose entropy is in the top ρ share of the micro-batch's, every process's (Wang et al., 2025: the
"forking" tokens), as TRL does. ``task.entropy_coef`` c adds ``-c H`` to each token's first term, H the entropy
of the distribution the token was drawn from (at the temperature), so that the policy does not collapse onto
one answer; it is added up as the rest (TRL averages it over the tokens whatever the loss).

With ``task.log_completions``, every training completion is a line of the run's ``completions.jsonl``: the
step it trains, its prompt, its text and length, its reward (each reward's too, None where one did not judge
it), its advantage, and the columns reward functions logged with ``log_extra``; so is every completion an
evaluation during training samples (``"split": "validation"``, at the steps done, without an advantage).

Evaluation samples one completion of each prompt (the run's seed, its own random stream, so every evaluation
draws alike and training's draws are untouched) and reports the mean reward (``reward``, the default
``train.metric``; with several rewards also each one's, ``reward/NAME``) and the mean completion length in
tokens.
"""

from __future__ import annotations

import json
import math
import warnings

import torch
from torch import nn

import lorafit
from lorafit.chat import render, text_pair
from lorafit.train.data import rows_at
from lorafit.train.distributed import SINGLE, Distributed, unwrap
from lorafit.train.rewards import RewardCall, build_rewards, score_all
from lorafit.train.tasks import (LOSS_CHUNK_LOGITS, CausalLM, chunked_cross_entropy, columns_to_rows,
                                  eager_generation, forward_hidden, head_is_plain, row_entropy)


class GRPO(CausalLM):
    metric = "reward"
    skipped_because = "the prompt leaves no room for task.max_new_tokens within"

    def __init__(self, config, tokenizer, labels=None) -> None:
        super().__init__(config, tokenizer, labels)
        self._rewards = None  # loaded at the first reward: a run's model is a second model in memory
        self._log: dict[str, list] = {}  # what train_log reports, as [sum, count] since it was last read
        self._tokens = 0  # the last loss_sum's: its prompts, each as often as it was sampled, and completions
        self._warned_unjudged = False  # of completions that no reward judged (every function returned None)
        self._state = _trainer_state(0, 0, 0.0, True)  # reward functions' trainer_state
        self.keep_samples = config.task.log_completions  # every sampled completion, for completions.jsonl
        self._dist = SINGLE  # the processes of the last window (task.top_entropy_quantile's quantile is over all)

    def cache_key(self, kind: str) -> tuple:
        return (*super().cache_key(kind), self.config.data.output_field)

    def rewards(self) -> list:
        if self._rewards is None:
            self._rewards = build_rewards(self.config.task, conversational=bool(self.config.data.messages_field),
                                          device=self.config.model.device)
        return self._rewards

    def passes_per_window(self) -> int:
        return self.config.task.num_iterations

    def training_progress(self, step: int, max_steps: int, epoch: float, is_main: bool) -> None:
        self._state = _trainer_state(step, max_steps, epoch, is_main)

    def _reward_call(self) -> RewardCall:
        return RewardCall(self._state, reserved=frozenset({*_TRAIN_METRICS, *_LOOP_FIELDS}))

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
        """Each row's prompt, rendered up to where the assistant's turn starts, its messages (for the reward), its
        reference and all its columns; rows whose prompt leaves fewer than task.max_new_tokens of task.max_length
        are left out."""
        t = self.config.task
        raw = columns_to_rows(batch)
        rows = [self.prompt_and_reference(row) for row in raw]
        prompts, references = [p for p, _ in rows], [r for _, r in rows]
        ids = self._ids_many([render(self.tok, p, generation_prompt=True) for p in prompts])
        out: dict[str, list] = {"input_ids": [], "prompt_messages": [], "reference": [], "row": [], "length": []}
        for prompt, reference, row, x in zip(prompts, references, raw, ids):
            if len(x) + t.max_new_tokens > t.max_length:
                continue
            out["input_ids"].append(x)
            out["prompt_messages"].append(json.dumps(prompt))
            out["reference"].append(None if reference is None else [reference])
            out["row"].append(json.dumps(row, default=str))  # every column, for reward functions that ask
            out["length"].append(len(x))
        return out

    def collate(self, feats: list[dict]) -> dict:
        """Left-padded prompts (generation continues them), their messages and references; a unit is a
        completion."""
        return {"input_ids": self._pad([f["input_ids"] for f in feats], self.pad_id, left=True),
                "attention_mask": self._pad([[1] * len(f["input_ids"]) for f in feats], 0, left=True),
                "prompts": [json.loads(f["prompt_messages"]) for f in feats],
                "references": [f["reference"][0] if f.get("reference") else None for f in feats],
                "rows": [json.loads(f["row"]) for f in feats],
                "prompt_tokens": sum(len(f["input_ids"]) for f in feats),
                "units": torch.tensor(len(feats) * self.config.task.num_generations)}

    # -- training ---------------------------------------------------------------------
    @torch.no_grad()
    def prepare_window(self, model, micro: list[tuple[dict, bool]], dist: Distributed = SINGLE) -> list[int] | None:
        """Samples and scores the completions of every micro-batch of a step (the batch dicts gain them), before
        the step's first forward: the advantages may depend on the whole step's rewards ("batch" scaling) and the
        loss's units on its tokens ("dapo"), which this returns (None: the completions, as collated). A
        micro-batch this process has no rows of (DDP pads with one) gets a one-token stand-in that carries no
        loss."""
        t = self.config.task
        self._dist = dist
        policy = unwrap(model)
        real = [batch for batch, mine in micro if mine]
        if real:
            self._sample_and_score(policy, real)
        for batch, mine in micro:
            if not mine:
                ids = batch["input_ids"]
                batch.update(seqs=torch.cat([ids, ids[:, -1:]], 1), prompt_mask=batch["attention_mask"],
                             completion_mask=ids.new_zeros(ids.shape[0], 1, dtype=torch.float32),
                             advantages=torch.zeros(ids.shape[0]), trained_tokens=0)
        scaling = t.reward_scaling()
        divisor = None  # "group": each group's own standard deviation
        if scaling == "none":
            divisor = 1.0
        elif scaling == "batch":  # the standard deviation of all the step's rewards, every process's
            mine = torch.cat([b["rewards"] for b in real]).double() if real else torch.zeros(0, dtype=torch.float64)
            n, total, squares = dist.all_reduce_sum([len(mine), float(mine.sum()), float((mine * mine).sum())],
                                                    micro[0][0]["input_ids"].device)
            divisor = math.sqrt(max(squares - total * total / max(n, 1), 0.0) / max(n - 1, 1)) + 1e-4
        for batch in real:
            batch["advantages"] = group_advantages(batch.pop("rewards"), t.num_generations, divisor)
            for sample, advantage in zip(batch.pop("samples", ()), batch["advantages"].tolist()):
                self._samples.append({**sample, "advantage": advantage})
        if t.grpo_loss in ("dapo", "cispo"):  # the loop divides by the step's completion tokens
            return [int(batch["completion_mask"].sum()) if mine else 0 for batch, mine in micro]
        if t.grpo_loss == "bnpo":  # each micro-batch's token mean counts once
            return [int(mine) for _, mine in micro]
        return None

    def _sample_and_score(self, policy: nn.Module, batches: list[dict]) -> None:
        """Samples the completions of all ``batches``' prompts in one generation (a GPU generates many rows for
        about the time of few) and scores them in one call per reward; then gives each micro-batch its rows, cut
        to its own prompt width and its longest completion, so that its training forward carries no more padding
        than it would alone."""
        t, n = self.config.task, self.config.task.num_generations
        width = max(b["input_ids"].shape[1] for b in batches)

        def left_padded(key: str, value: int) -> torch.Tensor:
            return torch.cat([nn.functional.pad(b[key], (width - b[key].shape[1], 0), value=value) for b in batches])

        joined = {"input_ids": left_padded("input_ids", self.pad_id),
                  "attention_mask": left_padded("attention_mask", 0),
                  **{key: [x for b in batches for x in b[key]] for key in ("prompts", "references", "rows")}}
        seqs, mask, completions = self._sample_in_calls(policy, joined, n)
        lengths, ids = completion_tokens(seqs, mask, width)
        call = self._reward_call()
        parts = self._scores(joined, completions, n, ids, call)
        rewards = self._weighted(parts)
        self._add_log(rewards, parts, mask)
        for name, (total, count) in call.metrics.items():
            self._add(name, total, count)
        samples = self._sample_records(None, joined, completions, n, lengths, rewards, parts, call.extra) \
            if self.keep_samples else None
        loss_mask = mask
        if t.mask_truncated_completions and self.tok.eos_token_id is not None:
            # an end token within the completion's own tokens: the columns after it may be padding of any id
            loss_mask = mask * ((seqs[:, width:] == self.tok.eos_token_id) & (mask > 0)).any(1, keepdim=True)
        start = 0
        for b in batches:
            rows, own = b["input_ids"].shape[0] * n, b["input_ids"].shape[1]
            end = start + rows
            longest = max(lengths[start:end])
            prompt_mask = b["attention_mask"].repeat_interleave(n, dim=0)
            b.update(seqs=seqs[start:end, width - own:width + longest], prompt_mask=prompt_mask,
                     completion_mask=loss_mask[start:end, :longest], rewards=rewards[start:end],
                     trained_tokens=b["prompt_tokens"] * n + sum(lengths[start:end]))
            if samples is not None:
                b["samples"] = samples[start:end]
            start = end

    def _sample_records(self, examples: list[int] | None, joined: dict, completions: list[str], n: int,
                        lengths: list[int], rewards: torch.Tensor, parts: torch.Tensor,
                        extra: dict[str, list]) -> list[dict]:
        """The records of completions of ``joined``'s prompts, ``n`` each (of the evaluation's ``examples``, by
        index): all but a training completion's advantage (and the loop's step and split)."""
        chat = bool(self.config.data.messages_field)
        names = [name for name, _ in self.rewards()]
        out = []
        for i, (text, length, reward, scores) in enumerate(zip(completions, lengths, rewards.tolist(),
                                                                parts.tolist())):
            prompt = joined["prompts"][i // n]
            out.append({**({} if examples is None else {"example": examples[i // n]}),
                        "prompt": prompt if chat else text_pair(prompt, [])[0], "completion": text,
                        "length": length, "reward": reward,
                        "rewards": {name: None if math.isnan(v) else v for name, v in zip(names, scores)},
                        **{column: values[i] for column, values in extra.items()}})
        return out

    def _sample_in_calls(self, policy: nn.Module, joined: dict, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``sample`` in generations of at most task.generation_batch_size completions (0: one for all), whose
        sequences and masks are padded on the right to the longest: their KV caches need not fit at once."""
        cap, prompts = self.config.task.generation_batch_size, joined["input_ids"].shape[0]
        per_call = max(cap // n, 1) if cap else prompts
        if per_call >= prompts:
            return self.sample(policy, joined, n)
        calls = [self.sample(policy, {key: value[start:start + per_call] for key, value in joined.items()}, n)
                 for start in range(0, prompts, per_call)]
        length = max(seqs.shape[1] for seqs, _, _ in calls)
        seqs = torch.cat([nn.functional.pad(s, (0, length - s.shape[1]), value=self.pad_id) for s, _, _ in calls])
        mask = torch.cat([nn.functional.pad(m, (0, length - s.shape[1])) for s, m, _ in calls])
        return seqs, mask, [text for _, _, texts in calls for text in texts]

    def loss_sum(self, model, batch) -> torch.Tensor:
        t = self.config.task
        seqs, mask = batch["seqs"], batch["completion_mask"]
        logp, entropy = self.completion_logps(model, seqs, batch["prompt_mask"], mask.shape[1], entropy=True,
                                              entropy_grad=bool(t.entropy_coef))
        self._add("entropy", (entropy.detach() * mask).sum(), mask.sum())
        old = batch.get("old_logps")
        if old is None:  # the batch's first step: the model that sampled is this one
            old = logp.detach()
            if t.num_iterations > 1:
                batch["old_logps"] = old
        log_ratio = logp - old
        if t.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        ratio = torch.exp(log_ratio)
        advantages = batch["advantages"].to(logp.device)[:, None]
        low, high = 1 - t.grpo_epsilon, 1 + (t.grpo_epsilon if t.grpo_epsilon_high is None else t.grpo_epsilon_high)
        if t.num_iterations > 1 and t.grpo_loss != "sapo":  # how much of the later steps the clip cuts off
            clipped = ratio > high if t.grpo_loss == "cispo" else \
                ((ratio < low) & (advantages < 0)) | ((ratio > high) & (advantages > 0))
            self._add("clip_ratio", (clipped * mask).sum().detach(), mask.sum())
        if t.grpo_loss == "cispo":  # the capped ratio weighs the token's policy gradient, which is never cut off
            per_token = -ratio.clamp(max=high).detach() * advantages * logp
        elif t.grpo_loss == "sapo":  # a smooth gate, 1 at ratio 1 (4 sigmoid' = 1), in place of the clip
            tau = torch.where(advantages > 0, t.sapo_temperature_pos, t.sapo_temperature_neg)
            per_token = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * advantages
        else:
            capped = ratio if t.grpo_delta is None else ratio.clamp(max=t.grpo_delta)
            per_token = -torch.min(capped * advantages, ratio.clamp(low, high) * advantages)
        if t.entropy_coef:  # a bonus for the entropy of the distributions the tokens were drawn from
            per_token = per_token - t.entropy_coef * entropy
        if t.top_entropy_quantile < 1:
            per_token = per_token * self._high_entropy(entropy.detach(), mask)
        if t.grpo_beta:
            reference = batch.get("reference_logps")
            if reference is None:
                policy = unwrap(model)
                with torch.no_grad(), lorafit.disabled(policy):
                    reference = self.completion_logps(policy, seqs, batch["prompt_mask"], mask.shape[1])
                if t.num_iterations > 1:
                    batch["reference_logps"] = reference
            diff = reference - logp
            kl = torch.exp(diff) - diff - 1
            self._add("kl", (kl.detach() * mask).sum(), mask.sum())
            per_token = per_token + t.grpo_beta * kl
        self._tokens = batch["trained_tokens"]
        total = per_token * mask
        if t.grpo_loss in ("grpo", "sapo"):
            return (total.sum(1) / mask.sum(1).clamp(min=1)).sum()
        if t.grpo_loss == "dr_grpo":
            return total.sum() / t.max_new_tokens
        if t.grpo_loss == "bnpo":
            return total.sum() / mask.sum().clamp(min=1)
        return total.sum()  # dapo and cispo: the loop divides by the step's tokens; luspo: by its completions

    def trained_tokens(self, counted: int) -> int:
        return self._tokens

    def _high_entropy(self, entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The completion tokens whose entropy is at least the (1 - task.top_entropy_quantile) quantile of the
        micro-batch's, every process's (the "forking" tokens where the policy chooses between paths)."""
        # NaN for the other places, which nanquantile leaves out: no host sync to select the tokens
        every = self._dist.gather_cat(entropy.float().masked_fill(mask == 0, math.nan).flatten())
        threshold = torch.nanquantile(every, 1 - self.config.task.top_entropy_quantile)
        return ((entropy >= threshold) & (mask > 0)).to(mask.dtype)  # no token at all: NaN, nothing selected

    def _add(self, name: str, value, count) -> None:
        entry = self._log.setdefault(name, [0.0, 0.0])
        entry[0] += value
        entry[1] += count

    def _add_log(self, rewards: torch.Tensor, parts: torch.Tensor, mask: torch.Tensor) -> None:
        n = len(rewards)
        groups = rewards.view(-1, self.config.task.num_generations)
        self._add("reward", float(rewards.sum()), n)
        self._add("reward_std", float(groups.std(1).sum()), len(groups))
        # a group whose completions all scored alike has no advantage to learn from
        self._add("flat_groups", float((groups.amax(1) == groups.amin(1)).sum()), len(groups))
        self._add("completion_length", float(mask.sum()), n)
        if parts.shape[1] > 1:  # each reward's mean over the completions it judged
            for (name, _), column in zip(self.rewards(), parts.T):
                self._add(f"reward/{name}", float(column.nansum()), int((~column.isnan()).sum()))
        unjudged = int(parts.isnan().all(1).sum())
        if unjudged and not self._warned_unjudged:  # once a run: it may hold for every step
            self._warned_unjudged = True
            warnings.warn(f"task.reward_function: every reward returned None for {unjudged} of a step's {n} "
                          "completions; a completion no reward judges gets the reward 0", stacklevel=2)

    def train_log(self) -> dict[str, tuple[float, float]]:
        """Since the last call: the training samples' mean reward (each reward's too, when there are several),
        the mean standard deviation of a group's rewards, the share of groups whose completions all scored alike
        (no advantage to learn from), the mean completion length, the mean entropy of the distributions the
        trained completion tokens were drawn from (at the temperature; its fall to 0 is a policy collapsing onto
        one answer), with task.grpo_beta the mean per-token KL
        estimate against the reference, and with several iterations the share of completion tokens whose ratio
        the clip cut off; as (sum, count) pairs that the loop sums over the processes. Every process reports the
        same names, but for those of reward functions' log_metric, which the loop joins."""
        t, rewards = self.config.task, self.rewards()
        shown = {"kl": bool(t.grpo_beta), "clip_ratio": t.num_iterations > 1 and t.grpo_loss != "sapo"}  # sapo: no clip
        names = [name for name in _TRAIN_METRICS if shown.get(name, True)]
        if len(rewards) > 1:
            names[1:1] = [f"reward/{name}" for name, _ in rewards]
        names += [name for name in self._log if name not in names]  # what reward functions logged (log_metric)
        out = {name: tuple(float(v) for v in self._log.get(name, (0.0, 0.0))) for name in names}
        self._log = {}
        return out

    @torch.no_grad()
    def sample(self, model: nn.Module, batch: dict, per_prompt: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``per_prompt`` completions of every prompt of ``batch`` (the model in eval mode: no dropout), as the
        whole sequences (prompt + completion, each prompt repeated ``per_prompt`` times in a row), the
        completion tokens' mask (up to and with the first end-of-sequence token) and the completions' texts."""
        t = self.config.task
        training = model.training
        model.eval()
        try:
            with eager_generation():
                seqs = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      do_sample=True, temperature=t.temperature, top_k=t.top_k, top_p=t.top_p,
                                      min_p=t.min_p or None, repetition_penalty=t.repetition_penalty,
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

    def completion_logps(self, model: nn.Module, seqs: torch.Tensor, prompt_mask: torch.Tensor, width: int,
                         entropy: bool = False, entropy_grad: bool = False
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Each completion token's log-probability (float32) at task.temperature, the distribution it was sampled
        from, rows x ``width`` (the completions' part of ``seqs``); ``prompt_mask`` marks the prompts' real
        tokens, whose left padding is masked and skipped in the positions, as generation saw them. The tokens
        after a completion's end see only what precedes them, and carry no loss. With ``entropy``, also the
        entropy of the distribution each token was drawn from, from the same logits (with a gradient only with
        ``entropy_grad``: task.entropy_coef's bonus).

        The head runs on the completion positions a chunk of rows at a time (recomputed in backward), as
        causal_lm's loss does: full-vocabulary float32 logits of every sampled token would be gigabytes for long
        completions. A model whose logits are not its head's output (soft-capping) gets them from its forward."""
        attention = torch.cat([prompt_mask, prompt_mask.new_ones(seqs.shape[0], width)], dim=1)
        inputs = {"input_ids": seqs, "attention_mask": attention, "use_cache": False,
                  "position_ids": (attention.cumsum(1) - 1).clamp(min=0)}
        targets = seqs[:, -width:]
        temperature = self.config.task.temperature
        if self._plain_head is None:
            first = torch.tensor([seqs.shape[1] - width - 1], device=seqs.device)  # predicts a first completion token
            self._plain_head = head_is_plain(model, inputs, first)
        if not self._plain_head:
            logits = model(**inputs, logits_to_keep=width + 1).logits[:, :-1].float() / temperature
            logp = -nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            return (logp, row_entropy(logits, entropy_grad)) if entropy else logp
        hidden, _ = forward_hidden(model, inputs, torch.zeros(0, dtype=torch.long, device=seqs.device))
        head = unwrap(model).get_output_embeddings()
        rows = max(1, LOSS_CHUNK_LOGITS // head.weight.shape[0])
        out = chunked_cross_entropy(lambda h: head(h) / temperature, hidden[:, -width - 1:-1].flatten(0, 1),
                                    targets.flatten(), rows, entropy, entropy_grad)
        if entropy:
            return -out[0].view(-1, width), out[1].view(-1, width)
        return -out.view(-1, width)

    def _scores(self, batch: dict, completions: list[str], per_prompt: int, ids: list[list[int]],
                call: RewardCall) -> torch.Tensor:
        """Each reward's score of each completion (``ids``: their token ids): completions x rewards, NaN where a
        function did not judge one."""
        prompts = [p for p in batch["prompts"] for _ in range(per_prompt)]
        references = [r for r in batch["references"] for _ in range(per_prompt)]
        rows = [r for r in batch["rows"] for _ in range(per_prompt)]
        return torch.tensor(score_all(self.rewards(), prompts, completions, references, rows, ids, call),
                            dtype=torch.float32).T

    def _weighted(self, parts: torch.Tensor) -> torch.Tensor:
        """The reward of each completion: the sum of the scores that judged it, or their sum weighted by
        task.reward_weights."""
        weights, judged = self.config.task.reward_weights, parts.nan_to_num(0.0)
        return judged.sum(1) if weights is None else judged @ torch.tensor(weights, dtype=torch.float32)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, model, features, device, batch_size, autocast, dist: Distributed = SINGLE) -> dict[str, float]:
        model.eval()
        rewards = self.rewards()
        sums = torch.zeros(len(rewards) + 2, dtype=torch.float64)  # the reward, each reward's score, the tokens
        judged = torch.zeros(len(rewards), dtype=torch.float64)  # each reward's judged completions
        n = 0
        call = self._reward_call()  # reward functions' log_metric values are averaged over the whole evaluation
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.config.train.seed)
            for idx in self._eval_batches(features, batch_size, dist, device):
                batch = self.collate(rows_at(features, idx or [0]))
                batch.update({k: batch[k].to(device) for k in ("input_ids", "attention_mask")})
                with autocast():
                    seqs, mask, completions = self.sample(unwrap(model), batch, 1)
                if idx is None:
                    continue
                lengths, ids = completion_tokens(seqs, mask, batch["input_ids"].shape[1])
                parts = self._scores(batch, completions, 1, ids, call)
                weighted = self._weighted(parts)
                if self.keep_samples:
                    self._samples += self._sample_records(idx, batch, completions, 1, lengths, weighted, parts,
                                                          call.extra)
                call.extra.clear()
                sums[0] += float(weighted.sum())
                sums[1:-1] += parts.nansum(0).double()
                judged += (~parts.isnan()).sum(0).double()
                sums[-1] += sum(lengths)
                n += len(completions)
        logged = sorted(set().union(*dist.gather_objects(list(call.metrics))))  # every process's log_metric names
        logged_sums = [x for name in logged for x in call.metrics.get(name, (0.0, 0))]
        k = len(rewards)
        totals = dist.all_reduce_sum([*sums.tolist(), *judged.tolist(), *logged_sums, n], device)
        sums, judged, logged_sums, n = totals[:k + 2], totals[k + 2:2 * k + 2], totals[2 * k + 2:-1], totals[-1]
        out = {"reward": sums[0] / max(n, 1)}
        if len(rewards) > 1:
            out.update({f"reward/{name}": value / max(count, 1)
                        for (name, _), value, count in zip(rewards, sums[1:-1], judged)})
        out["completion_length"] = sums[-1] / max(n, 1)
        out.update({name: logged_sums[2 * i] / max(logged_sums[2 * i + 1], 1) for i, name in enumerate(logged)})
        return out


# train_log's metrics, in its order (with several rewards each one's "reward/NAME" follows "reward"), and what the
# loop writes beside them in metrics.jsonl: names a reward function's log_metric may not take
_TRAIN_METRICS = ("reward", "reward_std", "flat_groups", "completion_length", "entropy", "kl", "clip_ratio")
_LOOP_FIELDS = {"type", "split", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}


def _trainer_state(step: int, max_steps: int, epoch: float, is_main: bool):
    """TRL's ``trainer_state`` argument of reward functions: where training stands, as transformers.Trainer's."""
    from transformers import TrainerState

    return TrainerState(global_step=step, max_steps=max_steps, epoch=epoch, is_world_process_zero=is_main)


def completion_tokens(seqs: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[list[int], list[list[int]]]:
    """Each completion's length (its mask's tokens) and token ids, of sequences whose prompts are ``width``
    wide: one copy to the host, which the rewards read."""
    lengths = mask.sum(1).long().tolist()
    return lengths, [row[:length] for row, length in zip(seqs[:, width:].tolist(), lengths)]


def group_advantages(rewards: torch.Tensor, per_prompt: int, divisor: float | None = None) -> torch.Tensor:
    """Each completion's reward minus its group's mean (the completions of one prompt, ``per_prompt`` in a row),
    over ``divisor``, or with None over its group's standard deviation + 1e-4."""
    groups = rewards.view(-1, per_prompt)
    centred = groups - groups.mean(1, keepdim=True)
    return (centred / (groups.std(1, keepdim=True) + 1e-4 if divisor is None else divisor)).flatten()
