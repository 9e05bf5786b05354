"""Rows of a prompt and two responses to it, one preferred: what task.type "preference" and "reward" read.

The prompt comes as causal_lm's does (``data.instruction`` and the ``data.instruction_field`` /
``data.input_field`` fields) or as chat messages in the prompt field; each response
(``data.chosen_field``, ``data.rejected_field``) is a text (the assistant's turn) or a list of chat messages
(TRL's conversational rows). Without a prompt, the responses are whole conversations.
"""

from __future__ import annotations


class PairRows:
    """The mixin of the tasks that read pairs: their cache key and prompt (needs ``Task``'s ``config`` and
    ``_prompt_text``)."""

    def cache_key(self, kind: str) -> tuple:
        d = self.config.data
        return (*super().cache_key(kind), d.chosen_field, d.rejected_field)

    def _prompt_messages(self, row: dict) -> list[dict]:
        """The prompt as chat messages: a user turn of the instruction and input fields (a prompt field that
        holds messages, as conversational preference data sets have it, is those messages), or none when
        the config names no prompt (the responses are then whole conversations)."""
        d = self.config.data
        given = row.get(d.instruction_field) if d.instruction_field else None
        if isinstance(given, list):
            return turns(given, d.instruction_field) + ([{"role": "user", "content": str(row[d.input_field])}]
                                                        if d.input_field and row.get(d.input_field) else [])
        text = self._prompt_text(row)
        return [{"role": "user", "content": text}] if text else []


def turns(value, field: str) -> list[dict]:
    """A response as chat messages: a text is the assistant's turn; a list of ``{"role", "content"}`` messages is
    taken as it is."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise ValueError(f"field {field!r} must hold a text or a list of {{'role', 'content'}} messages, got "
                     f"{str(value)[:80]!r}")
