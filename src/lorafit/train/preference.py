"""``task.type = "preference"``: Direct Preference Optimization (DPO, Rafailov et al. 2023) of a causal LM.

Each row is a prompt with a preferred (``data.chosen_field``) and a dispreferred (``data.rejected_field``)
response. The adapter learns to raise the chosen response's log-likelihood relative to the reference model and
lower the rejected one's: per pair, ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` with ``p`` the trained
model's summed log-probabilities of a response's tokens and ``r`` the reference model's. With LoRA the
reference model is the base model itself, the adapter switched off (``lorafit.disabled``): no second copy of
the weights, where DPO's usual recipe keeps one.

Prompts and responses are rendered with the chat template as causal_lm's instruction rows are (the prompt a
user turn, the response the assistant's); only response tokens are scored. Evaluation reports the mean DPO
loss (``eval_loss``), how often the chosen response gets the larger implicit reward ``beta * (p - r)``
(``reward_accuracy``) and the mean difference of the two rewards (``reward_margin``).
"""

from __future__ import annotations

import torch
from torch import nn

import lorafit
from lorafit.train.distributed import SINGLE, Distributed, unwrap
from lorafit.train.tasks import IGNORE, CausalLM, columns_to_rows, loss_positions, rows_at

PAIR_FIELDS = ("input_ids", "labels", "rejected_ids", "rejected_labels")


class Preference(CausalLM):
    metric = "eval_loss"
    unit = "pairs"

    def cache_key(self, kind: str) -> tuple:
        d = self.config.data
        return (*super().cache_key(kind), d.chosen_field, d.rejected_field)

    def encode_batch(self, batch: dict[str, list], split: str) -> dict[str, list]:
        d, max_len = self.config.data, self.config.task.max_length
        conversations = []
        for row in columns_to_rows(batch):
            prompt = self._prompt_messages(row)
            for field in (d.chosen_field, d.rejected_field):
                conversations.append(self._pieces(prompt + _turns(row[field], field)))
        ids = iter(self._ids_many([text for pieces in conversations for text, _ in pieces]))
        encoded = [self._join(pieces, [next(ids) for _ in pieces]) for pieces in conversations]
        out: dict[str, list] = {name: [] for name in (*PAIR_FIELDS, "length")}
        for (chosen, chosen_labels), (rejected, rejected_labels) in zip(encoded[::2], encoded[1::2]):
            chosen, chosen_labels = chosen[:max_len], chosen_labels[:max_len]
            rejected, rejected_labels = rejected[:max_len], rejected_labels[:max_len]
            if all(x == IGNORE for x in chosen_labels[1:]) or all(x == IGNORE for x in rejected_labels[1:]):
                continue  # a response without a token inside max_length cannot be scored
            for name, value in zip(PAIR_FIELDS, (chosen, chosen_labels, rejected, rejected_labels)):
                out[name].append(value)
            out["length"].append(max(len(chosen), len(rejected)))
        return out

    def _prompt_messages(self, row: dict) -> list[dict]:
        """The prompt as chat messages: a user turn of the instruction and input fields (a prompt field that
        holds messages, as conversational preference data sets have it, is those messages), or none when
        the config names no prompt (the responses are then whole conversations)."""
        d = self.config.data
        given = row.get(d.instruction_field) if d.instruction_field else None
        if isinstance(given, list):
            return _turns(given, d.instruction_field) + ([{"role": "user", "content": str(row[d.input_field])}]
                                                         if d.input_field and row.get(d.input_field) else [])
        text = self._prompt_text(row)
        return [{"role": "user", "content": text}] if text else []

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        """The chosen responses' rows, then the rejected ones', in one right-padded batch; a unit is a pair."""
        seqs = [f["input_ids"] for f in feats] + [f["rejected_ids"] for f in feats]
        labels = self._pad([f["labels"] for f in feats] + [f["rejected_labels"] for f in feats], IGNORE)
        batch = {"input_ids": self._pad(seqs, self.pad_id), "labels": labels,
                 "attention_mask": self._pad([[1] * len(s) for s in seqs], 0),
                 "units": torch.tensor(len(feats))}
        batch.update(loss_positions(labels))
        return batch

    def rewards(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The implicit rewards ``beta * (p - r)`` of each pair's chosen and rejected response."""
        policy = self.sequence_logps(model, batch)
        with torch.no_grad(), lorafit.disabled(unwrap(model)):
            reference = self.sequence_logps(model, batch)
        rewards = self.config.task.dpo_beta * (policy - reference)
        pairs = rewards.shape[0] // 2
        return rewards[:pairs], rewards[pairs:]

    def loss_sum(self, model, batch) -> torch.Tensor:
        chosen, rejected = self.rewards(model, batch)
        return -nn.functional.logsigmoid(chosen - rejected).sum()

    def sequence_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's summed log-probability of its response tokens (causal_lm's per-token losses, negated)."""
        token_logps = -self.token_losses(model, batch)
        row_of = torch.div(batch["loss_positions"], batch["input_ids"].shape[1], rounding_mode="floor")
        return torch.zeros(batch["input_ids"].shape[0], device=token_logps.device).index_add(0, row_of, token_logps)

    @torch.no_grad()
    def evaluate(self, model, features, device, batch_size, autocast, dist: Distributed = SINGLE) -> dict[str, float]:
        model.eval()
        loss, right, margin, pairs = 0.0, 0.0, 0.0, 0
        for idx in self._eval_batches(features, batch_size, dist, device):
            batch = {k: v.to(device) for k, v in self.collate(rows_at(features, idx or [0])).items()}
            with autocast():
                chosen, rejected = self.rewards(model, batch)
            if idx is not None:
                loss += float(-nn.functional.logsigmoid(chosen - rejected).sum())
                right += float((chosen > rejected).sum())
                margin += float((chosen - rejected).sum())
                pairs += len(idx)
        loss, right, margin, pairs = dist.all_reduce_sum([loss, right, margin, pairs], device)
        pairs = max(pairs, 1)
        return {"eval_loss": loss / pairs, "reward_accuracy": right / pairs, "reward_margin": margin / pairs}


def _turns(value, field: str) -> list[dict]:
    """A response as chat messages: a text is the assistant's turn; a list of ``{"role", "content"}`` messages is
    taken as it is (every assistant turn in it is scored: turns the two responses share cancel in the loss)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise ValueError(f"field {field!r} must hold a text or a list of {{'role', 'content'}} messages, got "
                     f"{str(value)[:80]!r}")
