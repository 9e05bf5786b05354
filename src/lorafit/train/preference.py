"""``task.type = "preference"``: preference optimization of a causal LM (DPO and its relatives).

Each row is a prompt with a preferred (``data.chosen_field``) and a dispreferred (``data.rejected_field``)
response. The adapter learns to score the chosen response above the rejected one; ``task.preference_loss``
picks how, each pair's loss a function of the two responses' implicit rewards (``beta = task.dpo_beta``; ``p``
the trained model's summed log-probabilities of a response's tokens, ``r`` the reference model's, ``p̄`` and
``r̄`` the same per token, ``m`` the chosen reward minus the rejected one):

- ``"dpo"`` (Rafailov et al. 2023): rewards ``beta (p - r)``, loss ``-log sigmoid(m)``;
- ``"ipo"`` (Azar et al. 2023): rewards ``beta (p̄ - r̄)``, loss ``(m / beta - 1 / (2 beta))^2``, a target margin
  instead of an ever larger one (per-token log-ratios, as TRL computes IPO);
- ``"hinge"`` (SLiC, Zhao et al. 2023): DPO's rewards, loss ``max(0, 1 - m)``;
- ``"simpo"`` (Meng et al. 2024): no reference model, rewards ``beta p̄``, loss ``-log sigmoid(m - gamma)``;
- ``"orpo"`` (Hong et al. 2024): no reference model, the chosen response's per-token NLL ``-p̄c`` plus
  ``-beta log sigmoid(log odds(p̄c) - log odds(p̄r))``, ``odds(x) = e^x / (1 - e^x)``; rewards ``beta p̄``.

``task.sft_weight`` adds that much of the chosen response's per-token NLL to any of them (RPO's term);
``task.label_smoothing`` ``e`` makes DPO's and SimPO's ``-log sigmoid(x)`` ``-(1 - e) log sigmoid(x) - e log
sigmoid(-x)`` (conservative DPO, Mitchell 2023: pairs whose labels are wrong with probability ``e``). With
LoRA the reference model is the base model itself, the adapter switched off (``lorafit.disabled``): no second
copy of the weights, where the usual recipe keeps one; the reference-free losses skip that forward altogether
(and train full fine-tuning too). ``task.precompute_reference`` computes the reference's log-probabilities once,
before training (train/reference.py), which full fine-tuning of the others needs.

Prompts and responses are rendered with the chat template as causal_lm's instruction rows are (the prompt a
user turn, the response the assistant's); only response tokens are scored. ``task.max_prompt_length`` keeps the
end of a longer prompt, so that ``task.max_length`` leaves room for the responses. Evaluation reports the mean loss
(``eval_loss``), how often the chosen response gets the larger reward (``reward_accuracy``) and the mean
difference of the two rewards (``reward_margin``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import lorafit
from lorafit.train.config import REFERENCE_FREE_LOSSES
from lorafit.train.distributed import SINGLE, Distributed, unwrap
from lorafit.train.pairs import PairRows, turns
from lorafit.train.reference import REFERENCE, with_reference_column
from lorafit.train.tasks import IGNORE, CausalLM, columns_to_rows, loss_positions, rows_at

PAIR_FIELDS = ("input_ids", "labels", "rejected_ids", "rejected_labels")


class PairScores(NamedTuple):
    chosen: torch.Tensor  # each pair's implicit rewards
    rejected: torch.Tensor
    chosen_per_token: torch.Tensor  # the trained model's mean log-probability of a response token
    rejected_per_token: torch.Tensor
    reference: torch.Tensor | None  # each row's summed log-probability under the reference model (None: not used)


class Preference(PairRows, CausalLM):
    metric = "eval_loss"
    eval_totals = ("loss", "right", "margin", "pairs")  # eval_sums' names
    writes_samples = False  # its evaluation generates nothing (CausalLM's generations are not run)

    def __init__(self, config, tokenizer, labels=None) -> None:
        super().__init__(config, tokenizer, labels)
        self._eval_reference: tuple | None = None  # (key, each evaluation batch's reference log-probabilities, held)

    def encode_batch(self, batch: dict[str, list], split: str) -> dict[str, list]:
        d, max_len = self.config.data, self.config.task.max_length
        conversations = []
        for row in columns_to_rows(batch):
            prompt = self._prompt_messages(row)
            for field in (d.chosen_field, d.rejected_field):
                # every assistant turn of a response is scored: turns the two responses share cancel in the loss
                conversations.append(self._pieces(prompt + turns(row[field], field)))
        ids = iter(self._ids_many([text for pieces in conversations for text, _ in pieces]))
        encoded = [self._cut_prompt(*self._join(pieces, [next(ids) for _ in pieces])) for pieces in conversations]
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

    def cache_key(self, kind: str) -> tuple:
        return (*super().cache_key(kind), self.config.task.max_prompt_length)

    def _cut_prompt(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """A conversation's tokens with its prompt (everything before the first response token) cut to its last
        task.max_prompt_length tokens, as TRL keeps a prompt's end."""
        keep = self.config.task.max_prompt_length
        if keep is None:
            return ids, labels
        first = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
        drop = max(0, first - keep)
        return ids[drop:], labels[drop:]

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        """The chosen responses' rows, then the rejected ones', in one right-padded batch; a unit is a pair."""
        seqs = [f["input_ids"] for f in feats] + [f["rejected_ids"] for f in feats]
        labels = self._pad([f["labels"] for f in feats] + [f["rejected_labels"] for f in feats], IGNORE)
        batch = {"input_ids": self._pad(seqs, self.pad_id), "labels": labels,
                 "attention_mask": self._pad([[1] * len(s) for s in seqs], 0),
                 "units": torch.tensor(len(feats))}
        batch.update(loss_positions(labels))
        return with_reference_column(batch, feats)

    def pair_scores(self, model: nn.Module, batch: dict[str, torch.Tensor],
                    reference: torch.Tensor | None = None) -> PairScores:
        """Each pair's implicit rewards under task.preference_loss, and the per-token log-probabilities;
        ``reference``: the batch's reference log-probabilities, where they are known already."""
        t = self.config.task
        logps, tokens = self.sequence_logps(model, batch)
        per_token = logps / tokens
        if t.preference_loss in REFERENCE_FREE_LOSSES:
            rewards, reference = t.dpo_beta * per_token, None
        else:
            reference = self._reference(model, batch, reference)
            ratio = logps - reference
            rewards = t.dpo_beta * (ratio / tokens if t.preference_loss == "ipo" else ratio)
        pairs = rewards.shape[0] // 2
        return PairScores(rewards[:pairs], rewards[pairs:], per_token[:pairs], per_token[pairs:], reference)

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's summed log-probability under the reference model: the base, its adapter switched off (a model
        without adapters, as full fine-tuning starts, is its own reference)."""
        with lorafit.disabled(unwrap(model)):
            return self.sequence_logps(model, batch)[0]

    def _reference(self, model: nn.Module, batch: dict[str, torch.Tensor],
                   known: torch.Tensor | None) -> torch.Tensor:
        """The batch's reference log-probabilities: ``known`` (an evaluation's, kept from an earlier one), else the
        precomputed ones the batch carries (task.precompute_reference), else the reference model's now."""
        if known is not None:
            return known
        carried = batch.get(REFERENCE)
        return carried if carried is not None else self.reference_logps(model, batch)

    def pair_losses(self, s: PairScores) -> torch.Tensor:
        t = self.config.task
        beta, margin = t.dpo_beta, s.chosen - s.rejected
        if t.preference_loss in ("dpo", "simpo"):
            x = margin - t.simpo_gamma if t.preference_loss == "simpo" else margin
            loss = -nn.functional.logsigmoid(x)
            if t.label_smoothing:  # conservative DPO: a share of the pairs taken to be swapped
                loss = (1 - t.label_smoothing) * loss - t.label_smoothing * nn.functional.logsigmoid(-x)
        elif t.preference_loss == "ipo":
            loss = (margin / beta - 1 / (2 * beta)) ** 2
        elif t.preference_loss == "hinge":
            loss = torch.relu(1 - margin)
        else:  # orpo
            loss = -s.chosen_per_token - beta * nn.functional.logsigmoid(
                _log_odds(s.chosen_per_token) - _log_odds(s.rejected_per_token))
        return loss - t.sft_weight * s.chosen_per_token

    def loss_sum(self, model, batch) -> torch.Tensor:
        return self.pair_losses(self.pair_scores(model, batch)).sum()

    def sequence_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed log-probability of its response tokens (causal_lm's per-token losses, negated), and
        how many tokens that is."""
        token_logps = -self.token_losses(model, batch)
        row_of = torch.div(batch["loss_positions"], batch["input_ids"].shape[1], rounding_mode="floor")
        zeros = torch.zeros(batch["input_ids"].shape[0], device=token_logps.device)
        return zeros.index_add(0, row_of, token_logps), zeros.index_add(0, row_of, torch.ones_like(token_logps))

    def eval_sums(self, scores: PairScores, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """What an evaluation batch adds to the split's totals (summed over batches and processes)."""
        return {"loss": float(self.pair_losses(scores).sum()), "right": float((scores.chosen > scores.rejected).sum()),
                "margin": float((scores.chosen - scores.rejected).sum()), "pairs": int(batch["units"])}

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        pairs = max(totals["pairs"], 1)
        return {"eval_loss": totals["loss"] / pairs, "reward_accuracy": totals["right"] / pairs,
                "reward_margin": totals["margin"] / pairs}

    @torch.no_grad()
    def evaluate(self, model, features, device, batch_size, autocast, dist: Distributed = SINGLE) -> dict[str, float]:
        model.eval()
        # The reference model (the frozen base, in eval mode) scores the same batches alike at every evaluation of a
        # run: its log-probabilities are kept from the first, which halves the forwards of the later ones.
        held = (features, unwrap(model))  # held with the key, so that their ids stay theirs
        key = (id(features), id(held[1]), batch_size, str(device), dist.rank)
        known = self._eval_reference[1] if self._eval_reference and self._eval_reference[0] == key else None
        references, totals = [], {}
        for i, idx in enumerate(self._eval_batches(features, batch_size, dist, device)):
            batch = {k: v.to(device) for k, v in self.collate(rows_at(features, idx or [0])).items()}
            with autocast():
                scores = self.pair_scores(model, batch, known[i] if known else None)
            references.append(scores.reference)
            if idx is not None:
                for name, value in self.eval_sums(scores, batch).items():
                    totals[name] = totals.get(name, 0) + value
        self._eval_reference = (key, references, held)
        names = self.eval_totals  # every process sums the same names, batches or none
        return self.eval_metrics(dict(zip(names, dist.all_reduce_sum([totals.get(n, 0.0) for n in names], device))))


def _log_odds(per_token_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of ``p = exp(per_token_logp)``; expm1 keeps ``1 - p`` exact near ``p = 1``, and
    the clamp keeps a response the model is certain of finite."""
    x = per_token_logp.clamp(max=-1e-6)
    return x - torch.log(-torch.expm1(x))
