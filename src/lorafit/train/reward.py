"""``task.type = "reward"``: a reward model from preference pairs (Bradley-Terry, as InstructGPT trains one).

The model is a sequence classifier with one output, its score of a conversation; per pair the loss is
``-log sigmoid(sc - sr)`` with ``sc`` the chosen conversation's score and ``sr`` the rejected one's, plus
``task.reward_centering * (sc + sr)^2`` (Eisenstein et al. 2023) when set, which keeps the scores near 0
(only their differences are learned otherwise). With ``data.margin_field`` each pair's margin ``m`` asks the
chosen score to lead by that much: ``-log sigmoid(sc - sr - m)`` (Llama 2's reward models, a graded preference
scale mapped to margins). The adapter is a SEQ_CLS one: the new score head trains and
is saved with it, and PEFT's ``AutoPeftModelForSequenceClassification`` loads it.

A conversation is the prompt and a response rendered with the tokenizer's chat template (decoder LMs: the score
is read at the last token); an encoder's tokenizer without one (it has a separator token: BERT, RoBERTa) reads
the prompt and the response as a text pair, and a decoder's without one gets the default template (lorafit.chat),
as ``lorafit serve --task classify`` renders the conversations it scores.
Evaluation reports the mean loss (``eval_loss``), how often the chosen response scores higher (``accuracy``)
and the mean score difference (``reward_margin``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafit.chat import reads_text_pairs, render, text_pair
from lorafit.train.distributed import SINGLE, Distributed
from lorafit.train.pairs import PairRows, turns
from lorafit.train.tasks import Task, columns_to_rows, rows_at

SIDES = (("input_ids", "token_type_ids"), ("rejected_ids", "rejected_token_type_ids"))


class Reward(PairRows, Task):
    metric = "accuracy"
    skipped_because = "the two conversations do not differ within"
    writes_samples = True  # each pair's two conversations and scores

    def __init__(self, config, tokenizer, labels=None) -> None:
        super().__init__(config, tokenizer, labels)
        self.text_pair = reads_text_pairs(tokenizer)
        # token type ids only where a text pair gets them (BERT), so that every batch has the same columns
        self.token_types = self.text_pair and "token_type_ids" in tokenizer("a", "b")

    def cache_key(self, kind: str) -> tuple:
        return (*super().cache_key(kind), self.config.data.margin_field)

    def encode_batch(self, batch: dict[str, list], split: str) -> dict[str, list]:
        d = self.config.data
        rows = columns_to_rows(batch)
        conversations = [(self._prompt_messages(row), turns(row[field], field))
                         for row in rows for field in (d.chosen_field, d.rejected_field)]
        ids, types = self.encode_conversations(conversations)
        names = [name for side in SIDES for name in (side if self.token_types else side[:1])]
        out: dict[str, list] = {name: [] for name in (*names, *(("margin",) if d.margin_field else ()), "length")}
        for row, i in zip(rows, range(0, len(ids), 2)):
            (chosen, rejected), (chosen_types, rejected_types) = ids[i:i + 2], types[i:i + 2]
            if chosen == rejected and chosen_types == rejected_types:
                continue  # max_length cut both responses off where they differ: the pair says nothing
            values = (chosen, chosen_types, rejected, rejected_types) if self.token_types else (chosen, rejected)
            for name, value in zip(names, values):
                out[name].append(value)
            if d.margin_field:
                out["margin"].append(_margin(row[d.margin_field], d.margin_field))
            out["length"].append(max(len(chosen), len(rejected)))
        return out

    def encode_conversations(self, conversations: list[tuple[list[dict], list[dict]]]) -> tuple[list, list]:
        """The (prompt, response) conversations' token ids, at most task.max_length each, and their token type
        ids (None each where the tokenizer makes none). An encoder reads a conversation with a prompt as the text
        pair and one without as its response alone, row by row (as ``lorafit serve`` scores it), so a row's
        tokens never depend on the rows it is tokenized with."""
        max_len = self.config.task.max_length
        if not conversations:
            return [], []
        if not self.text_pair:
            texts = [render(self.tok, prompt + response) for prompt, response in conversations]
            ids = self.tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            return [x[:max_len] for x in ids], [None] * len(ids)
        texts = [text_pair(prompt, response) for prompt, response in conversations]
        ids: list = [None] * len(texts)
        types: list = [None] * len(texts)
        for with_prompt in (True, False):
            rows = [i for i, (first, _) in enumerate(texts) if bool(first) == with_prompt]
            if not rows:
                continue
            seconds = [texts[i][1] for i in rows]
            args = ([texts[i][0] for i in rows], seconds) if with_prompt else (seconds,)
            enc = self.tok(*args, truncation=True, max_length=max_len, return_attention_mask=False)
            for j, i in enumerate(rows):
                ids[i] = enc["input_ids"][j]
                if self.token_types:
                    types[i] = enc["token_type_ids"][j]
        return ids, types

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        """The chosen conversations' rows, then the rejected ones', in one right-padded batch; a unit is a pair."""
        seqs = [f["input_ids"] for f in feats] + [f["rejected_ids"] for f in feats]
        types = [f["token_type_ids"] for f in feats] + [f["rejected_token_type_ids"] for f in feats] \
            if self.token_types else None
        batch = {**self._padded(seqs, types), "units": torch.tensor(len(feats))}
        if feats and "margin" in feats[0]:
            batch["margin"] = torch.tensor([f["margin"] for f in feats], dtype=torch.float32)
        return batch

    @torch.no_grad()
    def score_conversations(self, model: nn.Module, conversations: list[tuple[list[dict], list[dict]]],
                            device: torch.device, batch_size: int) -> list[float]:
        """Each (prompt, response) conversation's score, encoded as training encodes them (GRPO's reward)."""
        ids, types = self.encode_conversations(conversations)
        out: list[float] = []
        for start in range(0, len(ids), batch_size):
            batch = self._padded(ids[start:start + batch_size], types[start:start + batch_size])
            out += model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0].float().tolist()
        return out

    def _padded(self, seqs: list[list[int]], types: list | None) -> dict[str, torch.Tensor]:
        """Right-padded token ids with their attention mask, and token type ids where the tokenizer makes them."""
        batch = {"input_ids": self._pad(seqs, self.pad_id),
                 "attention_mask": self._pad([[1] * len(s) for s in seqs], 0)}
        if self.token_types:
            batch["token_type_ids"] = self._pad(types, 0)
        return batch

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's chosen and rejected score, in float32."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        scores = model(**inputs).logits[:, 0].float()
        pairs = scores.shape[0] // 2
        return scores[:pairs], scores[pairs:]

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor,
                    margin: torch.Tensor | None = None) -> torch.Tensor:
        loss = -nn.functional.logsigmoid(chosen - rejected - (margin if margin is not None else 0))
        centering = self.config.task.reward_centering
        return loss + centering * (chosen + rejected) ** 2 if centering else loss

    def loss_sum(self, model, batch) -> torch.Tensor:
        return self.pair_losses(*self.scores(model, batch), batch.get("margin")).sum()

    @torch.no_grad()
    def evaluate(self, model, features, device, batch_size, autocast, dist: Distributed = SINGLE) -> dict[str, float]:
        model.eval()
        loss, right, margin, pairs = 0.0, 0.0, 0.0, 0
        for idx in self._eval_batches(features, batch_size, dist, device):
            batch = {k: v.to(device) for k, v in self.collate(rows_at(features, idx or [0])).items()}
            with autocast():
                chosen, rejected = self.scores(model, batch)
            if idx is not None:
                loss += float(self.pair_losses(chosen, rejected, batch.get("margin")).sum())
                right += float((chosen > rejected).sum())
                margin += float((chosen - rejected).sum())
                pairs += len(idx)
                if self.keep_samples:
                    self._samples += self._sample_records(idx, rows_at(features, idx), chosen, rejected)
        loss, right, margin, pairs = dist.all_reduce_sum([loss, right, margin, pairs], device)
        pairs = max(pairs, 1)
        return {"eval_loss": loss / pairs, "accuracy": right / pairs, "reward_margin": margin / pairs}

    def _sample_records(self, idx: list[int], rows: list[dict], chosen: torch.Tensor,
                        rejected: torch.Tensor) -> list[dict]:
        """Each pair's two conversations (as the model read them), their scores, and whether it ranked them
        right."""
        def text(ids: list[int]) -> str:
            return self.tok.decode(ids, skip_special_tokens=True)

        return [{"example": i, "chosen": text(f["input_ids"]), "rejected": text(f["rejected_ids"]),
                 "chosen_score": c, "rejected_score": r, "right": c > r}
                for i, f, c, r in zip(idx, rows, chosen.tolist(), rejected.tolist())]


def _margin(value, field: str) -> float:
    """A pair's margin as a float: a finite number (or its text, as a CSV file holds it)."""
    try:
        margin = float(value)
    except (TypeError, ValueError):
        margin = float("nan")
    if isinstance(value, bool) or not math.isfinite(margin):
        raise ValueError(f"field {field!r} (data.margin_field) must hold a finite number, got {value!r}")
    return margin
