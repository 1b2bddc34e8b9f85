"""The one place prompts are rendered, so training, evaluation and inference see the same text."""

from __future__ import annotations

from typing import Any

Message = dict[str, str]


def render_chat(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    """Render messages with the model's own chat template.

    The embedded model's template adds a default system message when none is given; because every
    caller goes through here, training and inference add it the same way.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # Base (non-chat) models: a plain, readable transcript.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def prompt_messages(prompt: str, system: str | None = None) -> list[Message]:
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    return messages
