"""``task.type = "kto"``: Kahneman-Tversky Optimization (Ethayarajh et al. 2024) from unpaired feedback.

Each row is a prompt (as for causal_lm) and one completion (``data.output_field``: a text or chat messages)
with a label (``data.label_field``): true or 1 for a desirable completion, false or 0 for an undesirable one,
the thumbs up or down that feedback logs hold, where DPO needs two completions ranked against each other. With
``r`` the completion's summed log-probability under the trained model minus the reference model's (the base,
the adapter switched off, as for DPO) and ``z`` the batch's estimate of the KL divergence between the two, the
loss is ``λD (1 - sigmoid(β (r - z)))`` for a desirable completion and ``λU (1 - sigmoid(β (z - r)))`` for an
undesirable one (``β = task.dpo_beta``, ``λD = task.kto_desirable_weight``, ``λU =
task.kto_undesirable_weight``). ``z`` is the mean of ``r`` over mismatched rows, each prompt with another
row's completion, clipped at 0 and without gradient, as TRL estimates it; it is taken per micro-batch and
process, so runs with another batch size, gradient accumulation or process count differ slightly.

A step runs the model with gradients on the completions and three times without: on the mismatched rows, and
the reference model on both. Evaluation reports the mean loss (``eval_loss``), how often a completion's reward
lies on its label's side of ``z`` (``reward_accuracy``), the mean reward of the desirable completions minus
that of the undesirable ones (``reward_margin``) and the KL estimate (``kl``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import lorafit
from lorafit.train.distributed import unwrap
from lorafit.train.pairs import turns
from lorafit.train.preference import Preference
from lorafit.train.reference import with_reference_column
from lorafit.train.tasks import IGNORE, columns_to_rows, loss_positions

KL = "kl_"  # the prefix of the mismatched rows' tensors in a batch


class KTOScores(NamedTuple):
    rewards: torch.Tensor  # each row's beta * (log-probability under the trained model - under the reference)
    kl: torch.Tensor  # beta * the batch's KL estimate, a scalar without gradient
    desirable: torch.Tensor  # each row's label, a bool
    reference: torch.Tensor | None  # the reference log-probabilities of the rows, then of the mismatched rows


class KTO(Preference):
    eval_totals = ("loss", "right", "desirable", "desirable_reward", "undesirable", "undesirable_reward", "kl", "rows")

    def encode_batch(self, batch: dict[str, list], split: str) -> dict[str, list]:
        """Each row's prompt + completion, and the same prompt with the next row's completion (the mismatched row
        that estimates the KL divergence; the last row takes the first's)."""
        d, max_len = self.config.data, self.config.task.max_length
        rows = columns_to_rows(batch)
        prompts = [self._prompt_messages(row) for row in rows]
        completions = [turns(row[d.output_field], d.output_field) for row in rows]
        labels = [_desirable(row[d.label_field], d.label_field) for row in rows]
        conversations = [self._pieces(p + c) for p, c in zip(prompts, completions)]
        conversations += [self._pieces(p + completions[(i + 1) % len(rows)]) for i, p in enumerate(prompts)]
        ids = iter(self._ids_many([text for pieces in conversations for text, _ in pieces]))
        encoded = [self._cut_prompt(*self._join(pieces, [next(ids) for _ in pieces])) for pieces in conversations]
        out: dict[str, list] = {name: [] for name in ("input_ids", "labels", "kl_ids", "kl_labels", "label", "length")}
        for (seq, seq_labels), (kl, kl_labels), label in zip(encoded[:len(rows)], encoded[len(rows):], labels):
            seq, seq_labels, kl, kl_labels = seq[:max_len], seq_labels[:max_len], kl[:max_len], kl_labels[:max_len]
            if all(x == IGNORE for x in seq_labels[1:]) or all(x == IGNORE for x in kl_labels[1:]):
                continue  # a completion without a token inside max_length cannot be scored
            for name, value in zip(out, (seq, seq_labels, kl, kl_labels, int(label), max(len(seq), len(kl)))):
                out[name].append(value)
        return out

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        """The rows in one right-padded batch, the mismatched rows in another (their tensors prefixed ``kl_``)."""
        batch: dict[str, torch.Tensor] = {"units": torch.tensor(len(feats)),
                                          "desirable": torch.tensor([bool(f["label"]) for f in feats])}
        for prefix, ids_name, labels_name in (("", "input_ids", "labels"), (KL, "kl_ids", "kl_labels")):
            labels = self._pad([f[labels_name] for f in feats], IGNORE)
            part = {"input_ids": self._pad([f[ids_name] for f in feats], self.pad_id), "labels": labels,
                    **loss_positions(labels)}
            batch.update({prefix + k: v for k, v in part.items()})
        batch["attention_mask"] = self._pad([[1] * len(f["input_ids"]) for f in feats], 0)  # the tokens trained on
        return with_reference_column(batch, feats)

    def pair_scores(self, model: nn.Module, batch: dict[str, torch.Tensor],
                    reference: torch.Tensor | None = None) -> KTOScores:
        mismatched = {k[len(KL):]: v for k, v in batch.items() if k.startswith(KL)}
        logps, _ = self.sequence_logps(model, batch)
        with torch.no_grad():
            kl_logps, _ = self.sequence_logps(model, mismatched)
        reference = self._reference(model, batch, reference)
        rows = logps.shape[0]
        beta = self.config.task.dpo_beta
        kl = beta * (kl_logps - reference[rows:]).mean().clamp(min=0)
        return KTOScores(beta * (logps - reference[:rows]), kl, batch["desirable"], reference)

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference log-probabilities of the rows, then of the mismatched rows."""
        mismatched = {k[len(KL):]: v for k, v in batch.items() if k.startswith(KL)}
        with lorafit.disabled(unwrap(model)):
            return torch.cat([self.sequence_logps(model, b)[0] for b in (batch, mismatched)])

    def pair_losses(self, s: KTOScores) -> torch.Tensor:
        t = self.config.task
        return torch.where(s.desirable, t.kto_desirable_weight * (1 - torch.sigmoid(s.rewards - s.kl)),
                           t.kto_undesirable_weight * (1 - torch.sigmoid(s.kl - s.rewards)))

    def eval_sums(self, scores: KTOScores, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        r, good = scores.rewards, scores.desirable
        right = torch.where(good, r > scores.kl, r < scores.kl)
        return {"loss": float(self.pair_losses(scores).sum()), "right": float(right.sum()),
                "desirable": float(good.sum()), "desirable_reward": float(r[good].sum()),
                "undesirable": float((~good).sum()), "undesirable_reward": float(r[~good].sum()),
                "kl": float(scores.kl) / self.config.task.dpo_beta * len(r), "rows": len(r)}

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        rows = max(totals["rows"], 1)
        margin = (totals["desirable_reward"] / max(totals["desirable"], 1)
                  - totals["undesirable_reward"] / max(totals["undesirable"], 1))
        return {"eval_loss": totals["loss"] / rows, "reward_accuracy": totals["right"] / rows,
                "reward_margin": margin, "kl": totals["kl"] / rows}


def _desirable(value, field: str) -> bool:
    """A label as a bool: true/false, or 1/0 (a number or its text, as a CSV file holds it)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"field {field!r} (data.label_field) must say whether the completion is desirable: true or "
                     f"false, 1 or 0; got {value!r}")
