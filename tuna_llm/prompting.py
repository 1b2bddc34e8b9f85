"""The one place prompts are rendered, so training, evaluation and inference see the same text.

Tools and tool calls are rendered by the base model's chat template (``apply_chat_template(..., tools=...)``). A
ChatML template that reads ``content`` only (SmolLM2's) would drop them without a word; for such a base, LLM Tuna
uses its own ChatML-with-tools template (``chat_template_for``), in the Hermes/Qwen ``<tool_call>`` convention,
which renders every conversation without tool content exactly as the model's own template does.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError

from tuna_llm.toolcalls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tool_call_text

Message = dict[str, Any]


class Conversation(list):
    """An example or a request: its messages (a list) and the tools offered to the model (None: no tools).

    Slicing keeps the tools, so ``conversation[:-1]`` is the same conversation's prompt."""

    def __init__(self, messages: Any = (), tools: list[dict] | None = None) -> None:
        super().__init__(messages)
        self.tools = tools if tools is None else list(tools)

    def __getitem__(self, key):
        got = super().__getitem__(key)
        return Conversation(got, tools=self.tools) if isinstance(key, slice) else got

    def __repr__(self) -> str:
        return f"Conversation({list.__repr__(self)}, tools={self.tools!r})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": list(self)}
        if self.tools:
            out["tools"] = self.tools
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Conversation:
        """From ``to_json``'s dict, or from a plain list of messages (no tools)."""
        if isinstance(obj, Conversation):
            return cls(obj, tools=obj.tools)
        if isinstance(obj, dict):
            return cls(obj.get("messages") or [], tools=obj.get("tools") or None)
        return cls(obj)


class ToolsUnsupported(ValueError):
    """The base model's chat template cannot render tools or tool calls; the message says why."""


class ChatTemplateRefused(TemplateError, ValueError):
    """The model's chat template refuses these messages by a rule of its own (``raise_exception``: e.g. Mistral's and
    Gemma's "roles must alternate user/assistant"), or fails on them; ``rule`` is what the template said."""

    def __init__(self, rule: str) -> None:
        self.rule = rule
        super().__init__(
            f"This model's chat template refuses these messages: {rule.rstrip('.')}. It is the model's own rule; "
            "change the messages to follow it."
        )


def apply_template(render, *args: Any, **kwargs: Any) -> Any:
    """``render(*args, **kwargs)`` (a chat template's renderer), its template errors as ChatTemplateRefused."""
    try:
        return render(*args, **kwargs)
    except TemplateError as exc:
        raise ChatTemplateRefused(str(exc) or type(exc).__name__) from None


def has_tool_content(messages: Any) -> bool:
    """Tools offered, an assistant message that calls tools, or a tool result."""
    if getattr(messages, "tools", None):
        return True
    return any(m.get("tool_calls") or m.get("function_call") or m.get("role") == "tool" for m in messages)


def render_chat(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    """Render messages with the model's chat template (the tools-capable one when there is tool content).

    ``tools`` default to ``messages.tools``. The embedded model's template adds a default system message when
    none is given; because every caller goes through here, training and inference add it the same way. Raises
    ToolsUnsupported for tool content the base model's chat cannot render, ChatTemplateRefused for messages its
    template refuses.
    """
    tools = template_tools(messages, tools)
    plain = list(messages)
    with_tools = bool(tools) or has_tool_content(plain)
    if not getattr(tokenizer, "chat_template", None):
        if with_tools:
            raise ToolsUnsupported(tools_unsupported_reason(tokenizer))
        # Base (non-chat) models: a plain, readable transcript.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in plain)
        return text + ("assistant: " if add_generation_prompt else "")
    if not with_tools:
        return apply_template(tokenizer.apply_chat_template, plain, tokenize=False, add_generation_prompt=add_generation_prompt)
    template, reason = _analysis(tokenizer)
    if reason:
        raise ToolsUnsupported(reason)
    return apply_template(
        tokenizer.apply_chat_template,
        plain,
        tools=tools,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def tools_unsupported_reason(tokenizer: Any) -> str | None:
    """None when this tokenizer's chat can render tools and tool calls; otherwise why not, in plain words."""
    return _analysis(tokenizer)[1]


def chat_template_for(tokenizer: Any) -> str:
    """The chat template to save with a fine-tune of this base (so the GGUF and the Modelfile carry it): LLM Tuna's
    tools-capable variant for a ChatML template that reads content only, else the model's own ("" if none)."""
    own = getattr(tokenizer, "chat_template", None) or ""
    if not own:
        return ""
    template, reason = _analysis(tokenizer)
    return template if reason is None else own


def answer_text(message: Message) -> str:
    """An assistant message as the text the model learns and is compared with: its content, then each call in
    the ``<tool_call>`` convention (what the tools-capable template writes after the generation prompt)."""
    parts = [message.get("content") or ""]
    for call in message.get("tool_calls") or ([{"function": message["function_call"]}] if message.get("function_call") else []):
        function = call.get("function", call)
        parts.append(("\n" if parts[-1] else "") + tool_call_text(function["name"], function.get("arguments") or {}))
    return "".join(parts)


def prompt_messages(prompt: str, system: str | None = None) -> list[Message]:
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    return messages


# ---------------------------------------------------------------------------------------------------------------
# Which template renders tools


def template_tools(messages: Any, tools: list[dict] | None = None) -> list[dict] | None:
    """The tools a chat template is given for these messages (``tools``, else ``messages.tools``), their keys sorted
    at every depth so one tool list is written the same way whatever order a file or a request gave its keys in
    (for every renderer of the template: transformers, llama.cpp's Python formatter)."""

    def sort(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: sort(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [sort(v) for v in value]
        return value

    tools = tools if tools is not None else getattr(messages, "tools", None)
    return sort(tools) if tools else None


_PROBE_NAME = "tuna_probe_lookup"
_PROBE_RESULT = "tuna-probe-result-7d1c"
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _PROBE_NAME,
            "description": "Look a word up.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
        },
    }
]
_PROBE = [
    {"role": "user", "content": "Look up tuna."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": _PROBE_NAME, "arguments": '{"word":"tuna"}'}}],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": _PROBE_RESULT},
]
# Conversations without tool content on which LLM Tuna's variant must render exactly as the model's own template.
_CHECKS = (
    [],
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "A colour."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
        {"role": "assistant", "content": "Four\nfive."},
    ],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}, {"role": "user", "content": ""}],
)
_analyses: dict[str, tuple[str | None, str | None]] = {}


def _analysis(tokenizer: Any) -> tuple[str | None, str | None]:
    """(the template that renders tools, None) or (None, why none does), worked out once per chat template."""
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        return None, "This base model has no chat template, so it cannot be given tools or tool calls."
    if not isinstance(own, str):
        return None, "This base model has several named chat templates; LLM Tuna renders tools with a single one."
    if own not in _analyses:
        _analyses[own] = _analyse(tokenizer, own)
    return _analyses[own]


def _apply(tokenizer: Any, messages: list[Message], *, template: str, tools: list[dict] | None = None, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _analyse(tokenizer: Any, own: str) -> tuple[str | None, str | None]:
    try:
        probe = _apply(tokenizer, _PROBE, template=own, tools=_PROBE_TOOLS, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError, or the template's own raise_exception
        probe = None
        failure = f"{type(exc).__name__}: {exc}"
    if probe is not None and _PROBE_NAME in probe and _PROBE_RESULT in probe:
        return own, None  # the model's own template renders tools, calls and results
    if "<|im_start|>" not in own:
        said = f" (it fails on them: {failure})" if probe is None else ""
        return None, (
            "This base model's chat template does not render tools or tool calls" + said + ", and LLM Tuna has no "
            "tools-capable variant of it; choose a base model whose chat template supports tools."
        )
    default_system, reason = _chatml_default_system(tokenizer, own)
    if reason:
        return None, reason
    variant = chatml_tools_template(default_system)
    for messages in _CHECKS:
        for add_generation_prompt in (False, True):
            try:
                expected = _apply(tokenizer, list(messages), template=own, add_generation_prompt=add_generation_prompt)
            except Exception:
                continue  # a conversation the model's own template refuses says nothing about the variant
            if _apply(tokenizer, list(messages), template=variant, add_generation_prompt=add_generation_prompt) != expected:
                return None, (
                    "This base model's ChatML chat template does not render tools or tool calls, and LLM Tuna's "
                    "tools-capable ChatML variant would change how it renders ordinary conversations, so it is not used."
                )
    return variant, None


def _chatml_default_system(tokenizer: Any, own: str) -> tuple[str | None, str | None]:
    """The system message a ChatML template adds when a conversation has none (None if it adds none)."""
    unsupported = (
        "This base model's chat template looks like ChatML but does not render tools or tool calls, and its "
        "opening is not plain ChatML, so LLM Tuna's tools-capable variant cannot stand in for it."
    )
    turn = "<|im_start|>user\nHi<|im_end|>\n"
    try:
        text = _apply(tokenizer, [{"role": "user", "content": "Hi"}], template=own, add_generation_prompt=False)
    except Exception:
        return None, unsupported
    if not text.endswith(turn):
        return None, unsupported
    head = text[: -len(turn)]
    if not head:
        return None, None
    opening, closing = "<|im_start|>system\n", "<|im_end|>\n"
    if head.startswith(opening) and head.endswith(closing) and "<|im_start|>" not in head[len(opening) : -len(closing)]:
        return head[len(opening) : -len(closing)], None
    return None, unsupported


# ---------------------------------------------------------------------------------------------------------------
# LLM Tuna's ChatML-with-tools template

TOOLS_TEMPLATE_MARK = "LLM Tuna ChatML with tools"
TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to help with the user's request. Their signatures are listed "
    "inside <tools></tools>, one JSON object per line:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nTo call a function, answer with a JSON object holding its name and arguments inside "
    f'{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} tags, one block per call:\n{TOOL_CALL_OPEN}\n{{"name": <function-name>, '
    f'"arguments": <arguments-json-object>}}\n{TOOL_CALL_CLOSE}'
)
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"


def _jinja_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def chatml_tools_template(default_system: str | None) -> str:
    """LLM Tuna's ChatML template with tools, for a base whose ChatML template reads ``content`` only.

    Without tools, tool calls or tool results it writes what plain ChatML writes (``<|im_start|>role\\ncontent
    <|im_end|>\\n`` per message, ``default_system`` as a first system message when the conversation opens without
    one). With them, the Hermes/Qwen convention: the tools' JSON signatures inside <tools></tools> at the end of
    the system turn (each system turn: Ollama's templates cannot tell the first from a later one), each call of an
    assistant turn after its content as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, and
    each tool result as a user turn inside <tool_response></tool_response>."""
    default = "none" if default_system is None else _jinja_string(default_system)
    return (
        "{#- " + TOOLS_TEMPLATE_MARK + " (Hermes/Qwen <tool_call> convention) -#}\n"
        "{%- set default_system = " + default + " -%}\n"
        "{%- macro tools_block() -%}\n"
        "{{- " + _jinja_string(TOOLS_INTRO) + " -}}\n"
        "{%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}\n"
        "{{- " + _jinja_string(TOOLS_OUTRO) + " -}}\n"
        "{%- endmacro -%}\n"
        "{%- for message in messages -%}\n"
        "{%- if loop.first and message['role'] != 'system' and (default_system is not none or tools) -%}\n"
        "{{- '<|im_start|>system\\n' -}}\n"
        "{%- if default_system is not none -%}{{- default_system -}}{%- endif -%}\n"
        "{%- if tools -%}{%- if default_system -%}{{- '\\n\\n' -}}{%- endif -%}{{- tools_block() -}}{%- endif -%}\n"
        "{{- '<|im_end|>\\n' -}}\n"
        "{%- endif -%}\n"
        "{%- set content = message['content'] if message['content'] is string else '' -%}\n"
        "{%- if message['role'] == 'system' -%}\n"
        "{{- '<|im_start|>system\\n' + content -}}\n"
        "{%- if tools -%}{{- '\\n\\n' -}}{{- tools_block() -}}{%- endif -%}\n"
        "{{- '<|im_end|>\\n' -}}\n"
        "{%- elif message['role'] == 'assistant' -%}\n"
        "{{- '<|im_start|>assistant\\n' + content -}}\n"
        "{%- for call in message['tool_calls'] or [] -%}\n"
        "{%- set function = call['function'] if call['function'] is defined else call -%}\n"
        "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}\n"
        "{{- '" + TOOL_CALL_OPEN + '\\n{"name": "\' + function[\'name\'] + \'", "arguments": \' -}}\n'
        "{%- if function['arguments'] is string -%}{{- function['arguments'] -}}"
        "{%- else -%}{{- function['arguments'] | tojson -}}{%- endif -%}\n"
        "{{- '}\\n" + TOOL_CALL_CLOSE + "' -}}\n"
        "{%- endfor -%}\n"
        "{{- '<|im_end|>\\n' -}}\n"
        "{%- elif message['role'] == 'tool' -%}\n"
        "{{- '<|im_start|>user\\n"
        + TOOL_RESPONSE_OPEN.replace("\n", "\\n")
        + "' + content + '"
        + TOOL_RESPONSE_CLOSE.replace("\n", "\\n")
        + "<|im_end|>\\n' -}}\n"
        "{%- else -%}\n"
        "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
    )
