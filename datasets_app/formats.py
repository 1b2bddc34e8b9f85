"""Example formats, and their normalisation to chat messages. Django-free."""

from __future__ import annotations

from typing import Any

PROMPT_COMPLETION = "prompt_completion"
MESSAGES = "messages"
ALPACA = "alpaca"

FORMAT_LABELS = {
    PROMPT_COMPLETION: 'prompt / completion ({"prompt": ..., "completion": ...})',
    MESSAGES: 'chat messages ({"messages": [...]})',
    ALPACA: 'Alpaca ({"instruction": ..., "input": ..., "output": ...})',
}
ROLES = ("system", "user", "assistant")


class ExampleError(ValueError):
    """A reason an example cannot be used, in plain words."""


def detect_format(obj: dict[str, Any]) -> str | None:
    if "messages" in obj:
        return MESSAGES
    if "prompt" in obj or "completion" in obj:
        return PROMPT_COMPLETION
    if "instruction" in obj or "output" in obj:
        return ALPACA
    return None


def to_messages(obj: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """Normalise one example to chat messages ending with the assistant's answer."""
    if fmt == PROMPT_COMPLETION:
        prompt = _text_field(obj, "prompt")
        completion = _text_field(obj, "completion")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if fmt == ALPACA:
        instruction = _text_field(obj, "instruction")
        extra = obj.get("input", "")
        if not isinstance(extra, str):
            raise ExampleError(f'field "input" must be a string, got {_type_name(extra)}')
        output = _text_field(obj, "output")
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _check_messages(obj.get("messages"))


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise ExampleError(f'field "messages" must be a list of messages, got {_type_name(messages)}')
    if not messages:
        raise ExampleError('field "messages" is empty')
    result: list[dict[str, str]] = []
    for index, message in enumerate(messages, start=1):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise ExampleError(f"{where} must be an object with role and content, got {_type_name(message)}")
        role = message.get("role")
        if "role" not in message:
            raise ExampleError(f'{where} is missing the field "role"')
        if role not in ROLES:
            raise ExampleError(f"{where} has role {role!r}; roles are system, user and assistant")
        if "content" not in message:
            raise ExampleError(f'{where} is missing the field "content"')
        content = message["content"]
        if not isinstance(content, str):
            raise ExampleError(f'{where}: "content" must be a string, got {_type_name(content)}')
        if not content.strip():
            raise ExampleError(f"{where} ({role}) has empty content")
        result.append({"role": role, "content": content})
    _check_role_order([m["role"] for m in result])
    return result


def _check_role_order(roles: list[str]) -> None:
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        position = roles.index("system", 1) + 1
        raise ExampleError(f"message {position} is a system message; only the first message may be one")
    if not body or body[-1] != "assistant":
        raise ExampleError("the last message must be from the assistant (the answer to learn)")
    if body[0] != "user":
        raise ExampleError("the conversation must start with a user message (after an optional system message)")
    offset = len(roles) - len(body)
    for index in range(1, len(body)):
        if body[index] == body[index - 1]:
            raise ExampleError(
                f"messages {offset + index} and {offset + index + 1} are both {body[index]}; user and assistant must take turns"
            )


def _text_field(obj: dict[str, Any], field: str) -> str:
    if field not in obj:
        raise ExampleError(f'missing the field "{field}"')
    value = obj[field]
    if not isinstance(value, str):
        raise ExampleError(f'field "{field}" must be a string, got {_type_name(value)}')
    if not value.strip():
        raise ExampleError(f'field "{field}" is empty')
    return value


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "true/false",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def type_name(value: Any) -> str:
    return _type_name(value)
