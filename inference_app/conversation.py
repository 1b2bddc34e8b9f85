"""A chat request's messages and tools, checked and normalised into a tuna_llm.prompting.Conversation.

OpenAI's request shapes are taken as OpenAI documents them: roles system, developer (read as system), user,
assistant and tool; ``content`` a string or a list of text parts (joined with a newline, as training joins
them); an assistant turn that only calls tools may have ``content`` null; its ``tool_calls`` carry their
arguments as a JSON object in a string; every ``tool`` message answers a call of the assistant turn before
it, and every such call is answered. Anything else is refused with a ``FieldError`` naming the field
(``messages[2].content[0]``) and what is accepted.

``tool_choice``: "auto" (the default when tools are given) and "none" are honoured. "required" and a named
function are refused: honouring them needs decoding constrained to a call, which this server does not do.
With "none" the prompt offers no tools (the model is not told about them) and the answer is never read for
calls; earlier calls and their results in the history are still rendered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tuna_llm.prompting import Conversation
from tuna_llm.toolcalls import canonical_arguments

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CHOICES = ("auto", "none")
CHOICES_TEXT = 'tool_choice must be "auto" or "none"'


class FieldError(ValueError):
    """A request value this server refuses; ``param`` names it as OpenAI's error objects do."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.reason = message


@dataclass(frozen=True)
class ChatRequest:
    conversation: Conversation  # what the model is given: the messages, with the tools it is offered
    tools: list[dict] | None  # the request's tools (also under "none", where they are not offered)
    tool_choice: str  # "auto" or "none"
    parallel_tool_calls: bool

    @property
    def reads_calls(self) -> bool:
        """Whether the answer is read for tool calls: tools offered and tool_choice "auto"."""
        return bool(self.conversation.tools)


def chat_request(messages: Any, *, tools: Any = None, tool_choice: Any = None, parallel_tool_calls: Any = True) -> ChatRequest:
    """The checked request; FieldError for the first value at fault."""
    checked_tools = _tools(tools)
    choice = _tool_choice(tool_choice, checked_tools)
    if not isinstance(parallel_tool_calls, bool):
        raise FieldError("parallel_tool_calls", f"must be true or false; got {parallel_tool_calls!r}.")
    normalised = _messages(messages)
    offered = checked_tools if choice == "auto" else None
    return ChatRequest(Conversation(normalised, tools=offered), checked_tools, choice, parallel_tool_calls)


# -- tools ---------------------------------------------------------------------------------------
def _tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise FieldError("tools", f"must be a list of tools; got {_kind(tools)}.")
    if len(tools) > MAX_TOOLS:
        raise FieldError("tools", f"at most {MAX_TOOLS} tools are accepted; got {len(tools)}.")
    checked, names = [], set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise FieldError(where, f'must be an object {{"type": "function", "function": {{...}}}}; got {_kind(tool)}.')
        if tool.get("type") != "function":
            raise FieldError(f"{where}.type", f'only "function" tools are supported; got {tool.get("type")!r}.')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise FieldError(f"{where}.function", f'must be an object with a "name"; got {_kind(function)}.')
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise FieldError(f"{where}.function.name", f"must be 1 to 64 letters, digits, underscores or dashes; got {name!r}.")
        if name in names:
            raise FieldError(f"{where}.function.name", f"the tool {name!r} is given twice.")
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise FieldError(f"{where}.function.description", f"must be a string; got {_kind(description)}.")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise FieldError(f"{where}.function.parameters", f"must be a JSON Schema object; got {_kind(parameters)}.")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise FieldError(f"{where}.function.strict", f"must be true or false; got {strict!r}.")
        entry = {"name": name}
        if description is not None:
            entry["description"] = description
        entry["parameters"] = parameters if parameters is not None else {"type": "object", "properties": {}}
        checked.append({"type": "function", "function": entry})
    return checked or None


def _tool_choice(choice: Any, tools: list[dict] | None) -> str:
    if choice is None:
        return "auto" if tools else "none"
    if choice == "required" or isinstance(choice, dict):
        raise FieldError(
            "tool_choice",
            f'{CHOICES_TEXT}; got {choice!r}. "required" and a named function are not supported: this server does not '
            'constrain decoding to a call. Use "auto" (the model decides) and check message.tool_calls.',
        )
    if choice not in TOOL_CHOICES:
        raise FieldError("tool_choice", f"{CHOICES_TEXT}; got {choice!r}.")
    if choice == "auto" and not tools:
        raise FieldError("tool_choice", 'is "auto" but no tools are given: send tools, or leave tool_choice out.')
    return choice


# -- messages ------------------------------------------------------------------------------------
def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise FieldError("messages", f"must be a list of messages; got {_kind(messages)}.")
    if not messages:
        raise FieldError("messages", "is empty: send at least one message.")
    normalised: list[dict] = []
    pending: dict[str, str] = {}  # calls of the last assistant turn not answered yet: id -> where
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise FieldError(where, f"must be an object with a role and content; got {_kind(message)}.")
        role = message.get("role")
        if role not in ROLES:
            raise FieldError(f"{where}.role", f"must be one of {', '.join(ROLES)}; got {role!r}.")
        if role != "tool" and pending:
            _unanswered(pending)
        if "function_call" in message:
            raise FieldError(f"{where}.function_call", "the legacy function_call is not accepted here; send tool_calls.")
        out: dict[str, Any] = {"role": "system" if role == "developer" else role}
        calls = _tool_calls(message.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else None
        if role != "assistant" and message.get("tool_calls") is not None:
            raise FieldError(f"{where}.tool_calls", f"only assistant messages call tools; this one is {role!r}.")
        out["content"] = _content(message.get("content", _MISSING), f"{where}.content", may_be_null=bool(calls))
        if calls:
            out["tool_calls"] = calls
            pending = {call["id"]: f"{where}.tool_calls[{i}]" for i, call in enumerate(calls)}
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise FieldError(f"{where}.tool_call_id", "a tool message must give the id of the call it answers.")
            if call_id not in pending:
                raise FieldError(
                    f"{where}.tool_call_id",
                    f"{call_id!r} answers no call: a tool message must follow the assistant message with that call in tool_calls.",
                )
            del pending[call_id]
            out["tool_call_id"] = call_id
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise FieldError(f"{where}.name", f"must be a string; got {_kind(name)}.")
            out["name"] = name
        normalised.append(out)
    if pending:
        _unanswered(pending)
    return normalised


def _unanswered(pending: dict[str, str]) -> None:
    call_id, where = next(iter(pending.items()))
    raise FieldError(where, f"the call {call_id!r} has no answer: each call must be followed by a tool message with its tool_call_id.")


_MISSING = object()


def _content(content: Any, where: str, *, may_be_null: bool) -> str:
    if content is _MISSING or content is None:
        if may_be_null:
            return ""
        raise FieldError(where, "is required (null only for an assistant message with tool_calls).")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(where, f"must be a string or a list of text parts; got {_kind(content)}.")
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part:
            raise FieldError(f"{where}[{index}]", f'must be a part {{"type": "text", "text": "..."}}; got {_kind(part)}.')
        if part["type"] != "text":
            raise FieldError(
                f"{where}[{index}]", f"{part['type']!r} parts are not supported: the models here read text; send text parts only."
            )
        if not isinstance(part.get("text"), str):
            raise FieldError(f"{where}[{index}].text", f"must be a string; got {_kind(part.get('text'))}.")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls(calls: Any, where: str) -> list[dict] | None:
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise FieldError(where, f"must be a list of calls; got {_kind(calls)}.")
    checked, ids = [], set()
    for index, call in enumerate(calls):
        at = f"{where}[{index}]"
        if not isinstance(call, dict):
            raise FieldError(at, f'must be an object {{"id", "type": "function", "function": {{"name", "arguments"}}}}; got {_kind(call)}.')
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise FieldError(f"{at}.id", "must be the call's id (a non-empty string).")
        if call_id in ids:
            raise FieldError(f"{at}.id", f"the id {call_id!r} is used twice.")
        ids.add(call_id)
        if call.get("type", "function") != "function":
            raise FieldError(f"{at}.type", f'only "function" calls are supported; got {call.get("type")!r}.')
        function = call.get("function")
        if not isinstance(function, dict):
            raise FieldError(f"{at}.function", f'must be an object {{"name", "arguments"}}; got {_kind(function)}.')
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise FieldError(f"{at}.function.name", f"must be 1 to 64 letters, digits, underscores or dashes; got {name!r}.")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise FieldError(f"{at}.function.arguments", f"must be a JSON object in a string; got {_kind(arguments)}.")
        try:
            arguments = canonical_arguments(arguments)
        except ValueError as exc:
            raise FieldError(f"{at}.function.arguments", str(exc)) from None
        checked.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return checked or None


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
