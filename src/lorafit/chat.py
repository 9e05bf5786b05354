"""Chat messages as model text, one way for training and serving: an adapter trained on conversations rendered
one way answers well only to conversations rendered the same way.

A tokenizer's own chat template renders them; a tokenizer without one (a base model's, a test's) gets
``DEFAULT_CHAT_TEMPLATE``. A model that scores a conversation but has neither a template nor a decoder's
habits (an encoder: its tokenizer has a separator token, BERT, RoBERTa) reads it as a text pair instead, the
prompt first and the response second, as it reads any other pair of texts.
"""

from __future__ import annotations

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    """The conversation as text (tokenize it without adding special tokens: the template writes those it wants);
    ``generation_prompt`` ends it where the assistant's next turn starts."""
    if not messages:
        return ""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def reads_text_pairs(tokenizer) -> bool:
    """Does a scoring model with this tokenizer read a conversation as a (prompt, response) text pair? Only
    without a chat template and with a separator token: a decoder's tokenizer without a template would run the
    prompt into the response, so its conversations are rendered with the default template."""
    return not getattr(tokenizer, "chat_template", None) and getattr(tokenizer, "sep_token", None) is not None


def text_pair(prompt: list[dict], response: list[dict]) -> tuple[str, str]:
    """The prompt's and the response's messages as the two texts of a pair, each message's content on a line."""
    return "\n".join(m["content"] for m in prompt), "\n".join(m["content"] for m in response)
