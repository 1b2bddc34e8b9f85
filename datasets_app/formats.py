"""Example formats, and their normalisation to one shape: OpenAI's chat messages (a Conversation). Django-free.

Every format is read with the meaning its authors gave it: OpenAI's chat format (roles, `developer`, `name`,
content parts, assistant `weight`, tool calls and tool results, `tools`/`functions`), OpenAI's preference (DPO)
format, ShareGPT (`conversations` of `from`/`value`), the legacy prompt/completion format and Alpaca. A line that
cannot be used raises ExampleError with the reason; how a line was mapped is returned as notes (counted into the
validation report's mapping sentences).
"""

from __future__ import annotations

import json
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Any

from tuna_llm.prompting import Conversation, Message, answer_text
from tuna_llm.toolcalls import canonical_arguments

PROMPT_COMPLETION = "prompt_completion"
MESSAGES = "messages"
ALPACA = "alpaca"
SHAREGPT = "sharegpt"
PREFERENCE = "openai_preference"

FORMAT_LABELS = {
    PROMPT_COMPLETION: 'prompt / completion ({"prompt": ..., "completion": ...})',
    MESSAGES: 'chat messages ({"messages": [...]})',
    ALPACA: 'Alpaca ({"instruction": ..., "input": ..., "output": ...})',
    SHAREGPT: 'ShareGPT ({"conversations": [{"from": ..., "value": ...}]})',
    PREFERENCE: 'OpenAI preference ({"input": ..., "preferred_output": ..., "non_preferred_output": ...})',
}
ROLES = ("system", "user", "assistant", "tool")
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_call": "assistant",
}
TEXT_PARTS = ("text", "input_text", "output_text")
NOT_TEXT_PARTS = {
    "image_url": "an image",
    "input_image": "an image",
    "image": "an image",
    "input_audio": "audio",
    "audio": "audio",
    "file": "a file",
    "input_file": "a file",
}

# How a line was read, as sentences for the report: {note: sentence with {lines} and {count}}.
NOTE_SENTENCES = {
    "developer": "developer messages are read as system messages ({lines} line{s})",
    "weight0": "{count} assistant turn{cs} {chave} weight 0: kept as context, not learned ({lines} line{s})",
    "no_target": "{lines} line{s} {have} no assistant turn to learn (every assistant turn has weight 0): kept, they teach nothing",
    "trailing": "messages after the last assistant turn to learn are dropped on {lines} line{s}: nothing is learned from them",
    "parts": "content given as a list of text parts on {lines} line{s}: the parts are joined with a new line",
    "tools": "tools defined on {lines} line{s}; tool calls are rendered with the model's chat template",
    "tool_calls": "{count} assistant turn{cs} call{cverb} tools ({lines} line{s}); tool results are read as tool messages",
    "functions": "the legacy functions on {lines} line{s} are read as tools",
    "function_call": "the legacy function_call on {lines} line{s} is read as a tool call, and function messages as its results",
    "parallel_tool_calls": "parallel_tool_calls is set on {lines} line{s}: accepted, it changes nothing in training",
    "name": "message names are kept ({lines} line{s})",
    "sharegpt_tools": "ShareGPT tools on {lines} line{s} are read as OpenAI function tools",
}
FORMAT_SENTENCES = {
    PROMPT_COMPLETION: "each prompt is read as a user message and its completion as the assistant's answer, both exactly "
    "as written (a separator at the end of the prompt and a completion's leading space are kept)",
    MESSAGES: "OpenAI chat messages, read as OpenAI reads them",
    ALPACA: "instruction and input are joined (a blank line between) as the user message; output is the assistant's answer",
    SHAREGPT: "ShareGPT turns are read as chat messages: human as user, gpt as assistant, system as system, "
    "tool/observation as tool results, function_call as an assistant tool call",
    PREFERENCE: "input messages are the prompt, preferred_output the chosen answer and non_preferred_output the "
    "rejected one (a preference dataset, trained with DPO); the chosen answer is the reference for evaluation",
}


class ExampleError(ValueError):
    """A reason an example cannot be used, in plain words."""


@dataclass
class Normalised:
    """One line read: its conversation (ending with the assistant answer), the rejected answer for preference
    data, how it was mapped (note -> count on this line) and whether it has an assistant turn to learn."""

    conversation: Conversation
    rejected: Message | None = None
    notes: Tally = field(default_factory=Tally)
    targets: int = 0


def detect_format(obj: dict[str, Any]) -> str | None:
    if "messages" in obj:
        return MESSAGES
    if "preferred_output" in obj or "non_preferred_output" in obj:
        return PREFERENCE
    if "conversations" in obj:
        return SHAREGPT
    if "prompt" in obj or "completion" in obj:
        return PROMPT_COMPLETION
    if "instruction" in obj or "output" in obj:
        return ALPACA
    return None


def to_messages(obj: dict[str, Any], fmt: str) -> Conversation:
    """Normalise one example to a Conversation ending with the assistant's answer (a preference line: its input
    plus the preferred answer)."""
    return normalise(obj, fmt).conversation


def to_preference(obj: dict[str, Any]) -> tuple[Conversation, Message, Message]:
    """A preference line as (prompt, chosen, rejected)."""
    read = normalise(obj, PREFERENCE)
    return read.conversation[:-1], read.conversation[-1], read.rejected


def normalise(obj: dict[str, Any], fmt: str) -> Normalised:
    if fmt == PROMPT_COMPLETION:
        prompt = _text_field(obj, "prompt")
        completion = _text_field(obj, "completion")
        return Normalised(Conversation([_user(prompt), _assistant(completion)]), targets=1)
    if fmt == ALPACA:
        instruction = _text_field(obj, "instruction")
        extra = obj.get("input", "")
        if not isinstance(extra, str):
            raise ExampleError(f'field "input" must be a string, got {_type_name(extra)}')
        output = _text_field(obj, "output")
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return Normalised(Conversation([_user(user), _assistant(output)]), targets=1)
    if fmt == SHAREGPT:
        return _sharegpt(obj)
    if fmt == PREFERENCE:
        return _preference(obj)
    return _chat(obj.get("messages"), obj, where_messages='field "messages"')


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


# -- OpenAI chat ---------------------------------------------------------------------------------
def _chat(messages: Any, holder: dict[str, Any], *, where_messages: str, prompt_only: bool = False) -> Normalised:
    """OpenAI chat messages with the line's tools. `prompt_only`: a preference input (no answer to learn)."""
    if not isinstance(messages, list):
        raise ExampleError(f"{where_messages} must be a list of messages, got {_type_name(messages)}")
    if not messages:
        raise ExampleError(f"{where_messages} is empty")
    notes: Tally = Tally()
    tools = _tools(holder, notes)
    reader = _ChatReader(notes)
    for index, message in enumerate(messages, start=1):
        reader.add(index, message)
    result = reader.messages
    if prompt_only:
        return Normalised(Conversation(result, tools=tools), notes=notes)
    return _finish(result, tools, notes)


def _finish(result: list[Message], tools: list[dict] | None, notes: Tally) -> Normalised:
    """Checks a whole conversation has an answer, and drops what follows the last assistant turn to learn."""
    assistants = [i for i, m in enumerate(result) if m["role"] == "assistant"]
    if not assistants:
        raise ExampleError("has no assistant message; each example needs an assistant answer to learn")
    targets = [i for i in assistants if "weight" not in result[i]]
    last = targets[-1] if targets else assistants[-1]
    if not targets:
        notes["no_target"] += 1
    if last < len(result) - 1:
        notes["trailing"] += 1
        result = result[: last + 1]
    if tools:
        notes["tools"] += 1
    weight0 = sum(1 for m in result if m.get("weight") == 0)
    if weight0:
        notes["weight0"] += weight0
    return Normalised(Conversation(result, tools=tools), notes=notes, targets=len(targets))


class _ChatReader:
    """Reads OpenAI chat messages one by one, checking what OpenAI checks (roles, content, weight, tool calls
    answered by tool results with a matching tool_call_id)."""

    def __init__(self, notes: Tally) -> None:
        self.notes = notes
        self.messages: list[Message] = []
        self.open_calls: dict[str, str] = {}  # tool_call_id -> function name, of the last assistant turn with calls
        self.legacy_calls = 0

    def add(self, index: int, message: Any, *, where: str = "") -> None:
        where = where or f"message {index}"
        if not isinstance(message, dict):
            raise ExampleError(f"{where} must be an object with role and content, got {_type_name(message)}")
        if "role" not in message:
            raise ExampleError(f'{where} is missing the field "role"')
        role = message["role"]
        if role not in OPENAI_ROLES:
            raise ExampleError(f"{where} has role {role!r}; roles are system, developer, user, assistant and tool")
        if role == "developer":
            self.notes["developer"] += 1
            role = "system"
        if "weight" in message and role != "assistant":
            raise ExampleError(f'{where} ({role}) has a "weight"; only assistant messages take one')
        if role == "assistant":
            normalised = self._assistant(where, message)
        elif role in ("tool", "function"):
            normalised = self._tool_result(where, role, message)
        else:
            normalised = {"role": role, "content": _content(where, role, message, self.notes)}
            self.open_calls = {}
        name = message.get("name")
        if name is not None and "name" not in normalised:
            if not isinstance(name, str) or not name:
                raise ExampleError(f'{where}: "name" must be a non-empty string, got {_type_name(name)}')
            normalised["name"] = name
            self.notes["name"] += 1
        self.messages.append(normalised)

    def _assistant(self, where: str, message: dict[str, Any]) -> Message:
        calls = self._calls(where, message)
        if calls and message.get("content") is None:
            content = ""
        else:
            content = _content(where, "assistant", message, self.notes, allow_empty=bool(calls))
        result: Message = {"role": "assistant", "content": content}
        if "weight" in message:
            weight = message["weight"]
            if isinstance(weight, bool) or weight not in (0, 1):
                raise ExampleError(
                    f"{where} (assistant) has weight {json.dumps(weight)}; a weight is 0 (context, not learned) or 1 (learned)"
                )
            if weight == 0:
                result["weight"] = 0
        if calls:
            result["tool_calls"] = calls
            self.notes["tool_calls"] += 1
        self.open_calls = {call["id"]: call["function"]["name"] for call in calls}
        return result

    def _calls(self, where: str, message: dict[str, Any]) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []
        raw_calls = message.get("tool_calls")
        if raw_calls is not None:
            if not isinstance(raw_calls, list):
                raise ExampleError(f'{where}: "tool_calls" must be a list, got {_type_name(raw_calls)}')
            for number, call in enumerate(raw_calls, start=1):
                calls.append(self._call(f"{where}, tool call {number}", call))
        legacy = message.get("function_call")
        if legacy is not None:
            self.legacy_calls += 1
            self.notes["function_call"] += 1
            function = self._function(f"{where}: function_call", legacy)
            calls.append({"id": f"call_{self.legacy_calls}", "type": "function", "function": function})
        return calls

    def _call(self, where: str, call: Any) -> dict[str, Any]:
        if not isinstance(call, dict):
            raise ExampleError(f"{where} must be an object, got {_type_name(call)}")
        if call.get("type", "function") != "function":
            raise ExampleError(f'{where} has type {call.get("type")!r}; only "function" calls are supported')
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise ExampleError(f'{where} needs an "id" (a string), which its tool result names as tool_call_id')
        return {"id": call_id, "type": "function", "function": self._function(f"{where}: function", call.get("function"))}

    @staticmethod
    def _function(where: str, function: Any) -> dict[str, str]:
        if not isinstance(function, dict):
            raise ExampleError(f"{where} must be an object with name and arguments, got {_type_name(function)}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ExampleError(f'{where} is missing "name"')
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise ExampleError(f'{where}: "arguments" must be a JSON string, got {_type_name(arguments)}')
        try:
            canonical = canonical_arguments(arguments)
        except ValueError as exc:
            raise ExampleError(f"{where} {name!r}: {exc}") from None
        return {"name": name, "arguments": canonical}

    def _tool_result(self, where: str, role: str, message: dict[str, Any]) -> Message:
        if not self.open_calls:
            raise ExampleError(f"{where} is a {role} result but no assistant tool call comes before it")
        content = _content(where, "tool", message, self.notes, allow_empty=True)
        if role == "function":  # legacy: answers the function_call just before it, by name
            name = message.get("name")
            call_id = next((i for i, n in reversed(self.open_calls.items()) if n == name), None) if name else None
            call_id = call_id or next(reversed(self.open_calls))
        else:
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ExampleError(f'{where} (tool) is missing "tool_call_id", the id of the call it answers')
            if call_id not in self.open_calls:
                known = ", ".join(repr(i) for i in self.open_calls)
                raise ExampleError(f"{where} (tool) answers tool_call_id {call_id!r}, but the assistant turn before it called {known}")
        result: Message = {"role": "tool", "content": content, "tool_call_id": call_id}
        name = message.get("name") or self.open_calls[call_id]
        if isinstance(name, str) and name:
            result["name"] = name
        return result


def _content(where: str, role: str, message: dict[str, Any], notes: Tally, *, allow_empty: bool = False) -> str:
    if "content" not in message:
        raise ExampleError(f'{where} is missing the field "content"')
    content = message["content"]
    if content is None and allow_empty:
        return ""
    if isinstance(content, list):
        content = _join_parts(where, content)
        notes["parts"] += 1
    elif not isinstance(content, str):
        raise ExampleError(f'{where}: "content" must be a string or a list of text parts, got {_type_name(content)}')
    if not content.strip() and not allow_empty:
        raise ExampleError(f"{where} ({role}) has empty content")
    return content


def _join_parts(where: str, parts: list[Any]) -> str:
    texts = []
    for number, part in enumerate(parts, start=1):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ExampleError(f"{where}, content part {number} must be an object, got {_type_name(part)}")
        kind = part.get("type")
        if not isinstance(kind, str):
            raise ExampleError(f'{where}, content part {number} needs a "type" such as "text", got {_type_name(kind)}')
        if kind in NOT_TEXT_PARTS:
            raise ExampleError(
                f"{where}, content part {number} is {NOT_TEXT_PARTS[kind]} ({kind}); the base models here read text only: "
                "remove it or describe it in words"
            )
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            continue
        if kind not in TEXT_PARTS:
            raise ExampleError(f'{where}, content part {number} has type {kind!r}; use {{"type": "text", "text": ...}}')
        text = part.get("text")
        if not isinstance(text, str):
            raise ExampleError(f'{where}, content part {number} needs "text" (a string), got {_type_name(text)}')
        texts.append(text)
    return "\n".join(texts)


def _tools(holder: dict[str, Any], notes: Tally) -> list[dict[str, Any]] | None:
    tools: list[dict[str, Any]] = []
    raw = holder.get("tools")
    if raw is not None:
        if not isinstance(raw, list):
            raise ExampleError(f'field "tools" must be a list of tools, got {_type_name(raw)}')
        for number, tool in enumerate(raw, start=1):
            where = f"tool {number}"
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise ExampleError(f'{where} must be {{"type": "function", "function": {{...}}}}; only function tools are supported')
            tools.append({"type": "function", "function": _function_spec(where, tool.get("function"))})
    functions = holder.get("functions")
    if functions is not None:
        if not isinstance(functions, list):
            raise ExampleError(f'field "functions" must be a list of functions, got {_type_name(functions)}')
        notes["functions"] += 1
        for number, function in enumerate(functions, start=1):
            tools.append({"type": "function", "function": _function_spec(f"function {number}", function)})
    parallel = holder.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise ExampleError(f'field "parallel_tool_calls" must be true or false, got {_type_name(parallel)}')
        notes["parallel_tool_calls"] += 1
    return tools or None


def _function_spec(where: str, function: Any) -> dict[str, Any]:
    if not isinstance(function, dict):
        raise ExampleError(f"{where} must describe a function (name, description, parameters), got {_type_name(function)}")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ExampleError(f'{where} is missing the function\'s "name"')
    spec: dict[str, Any] = {"name": name}
    if "description" in function:
        spec["description"] = function["description"]
    parameters = function.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise ExampleError(f'{where} ({name}): "parameters" must be a JSON schema object, got {_type_name(parameters)}')
        spec["parameters"] = parameters
    return spec


# -- OpenAI preference (DPO) -------------------------------------------------------------------------
def _preference(obj: dict[str, Any]) -> Normalised:
    source = obj.get("input")
    if not isinstance(source, dict):
        raise ExampleError(f'field "input" must be an object with "messages", got {_type_name(source)}')
    prompt = _chat(source.get("messages"), source, where_messages='field "input.messages"', prompt_only=True)
    if not any(m["role"] == "user" for m in prompt.conversation):
        raise ExampleError('field "input.messages" has no user message to answer')
    chosen = _output(obj, "preferred_output", prompt.notes)
    rejected = _output(obj, "non_preferred_output", prompt.notes)
    if _answer_key(chosen) == _answer_key(rejected):
        raise ExampleError("preferred_output and non_preferred_output are the same answer; there is nothing to prefer")
    conversation = Conversation([*prompt.conversation, chosen], tools=prompt.conversation.tools)
    if conversation.tools:
        prompt.notes["tools"] += 1
    return Normalised(conversation, rejected=rejected, notes=prompt.notes, targets=1)


def _output(obj: dict[str, Any], key: str, notes: Tally) -> Message:
    value = obj.get(key)
    if not isinstance(value, list) or not value:
        raise ExampleError(f'field "{key}" must be a list with one assistant message, got {_type_name(value)}')
    if len(value) != 1:
        raise ExampleError(f'field "{key}" has {len(value)} messages; LLM Tuna compares one assistant message per side')
    message = value[0]
    if not isinstance(message, dict) or message.get("role") != "assistant":
        raise ExampleError(f'field "{key}" must hold an assistant message ({{"role": "assistant", "content": ...}})')
    reader = _ChatReader(notes)
    result = reader._assistant(f"{key} message 1", {k: v for k, v in message.items() if k != "weight"})
    return result


def _answer_key(message: Message) -> str:
    return json.dumps([message["content"].strip(), message.get("tool_calls", [])], sort_keys=True)


# -- ShareGPT ---------------------------------------------------------------------------------------
def _sharegpt(obj: dict[str, Any]) -> Normalised:
    turns = obj.get("conversations")
    if not isinstance(turns, list):
        raise ExampleError(f'field "conversations" must be a list of turns, got {_type_name(turns)}')
    if not turns:
        raise ExampleError('field "conversations" is empty')
    notes: Tally = Tally()
    holder: dict[str, Any] = {}
    tools = obj.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory writes the tools as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as exc:
            raise ExampleError(f'field "tools" is not valid JSON: {exc.msg}') from None
    if tools is not None and not isinstance(tools, list):
        raise ExampleError(f'field "tools" must be a list of functions (or that list as a JSON string), got {_type_name(tools)}')
    if tools:
        holder["tools"] = [t if isinstance(t, dict) and "function" in t else {"type": "function", "function": t} for t in tools]
        notes["sharegpt_tools"] += 1
    messages: list[Any] = []
    places: list[str] = []  # where each message came from, for the errors
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
        places.append('field "system"')
    calls = 0
    for index, turn in enumerate(turns, start=1):
        where = f"turn {index}"
        if not isinstance(turn, dict):
            raise ExampleError(f"{where} must be an object with from and value, got {_type_name(turn)}")
        speaker = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if speaker is None or ("value" not in turn and "content" not in turn):
            raise ExampleError(f'{where} needs "from" and "value"')
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise ExampleError(
                f"{where} has from {speaker!r}; ShareGPT speakers are human, gpt, system, tool (or observation, function_call)"
            )
        if speaker == "function_call":
            calls += 1
            messages.append({"role": "assistant", "content": None, "tool_calls": _sharegpt_calls(where, value, calls)})
            places.append(where)
            continue
        message: dict[str, Any] = {"role": role, "content": value}
        if role == "tool":
            previous = next((m for m in reversed(messages) if m["role"] != "tool"), None)
            answered = sum(1 for m in messages[len(messages) - _tool_run(messages) :] if m["role"] == "tool")
            ids = [c["id"] for c in previous.get("tool_calls", [])] if previous and previous["role"] == "assistant" else []
            if ids:
                message["tool_call_id"] = ids[min(answered, len(ids) - 1)]
        messages.append(message)
        places.append(where)
    reader = _ChatReader(notes)
    for place, message in zip(places, messages, strict=True):
        reader.add(0, message, where=place)
    return _finish(reader.messages, _tools(holder, notes), notes)


def _tool_run(messages: list[dict[str, Any]]) -> int:
    run = 0
    for message in reversed(messages):
        if message["role"] != "tool":
            break
        run += 1
    return run


def _sharegpt_calls(where: str, value: Any, number: int) -> list[dict[str, Any]]:
    """LLaMA-Factory's function_call turn: a JSON object {"name", "arguments"} or a list of them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ExampleError(f"{where} (function_call) is not valid JSON: {exc.msg}") from None
    calls = value if isinstance(value, list) else [value]
    result = []
    for offset, call in enumerate(calls):
        if not isinstance(call, dict):
            raise ExampleError(f'{where} (function_call) must be {{"name": ..., "arguments": {{...}}}}')
        arguments = call.get("arguments", {})
        result.append(
            {
                "id": f"call_{number}_{offset + 1}",
                "type": "function",
                "function": {"name": call.get("name"), "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
            }
        )
    return result


# -- helpers ----------------------------------------------------------------------------------------
def message_text(message: Message) -> str:
    """The text of a message for counting and comparing: its content, then its tool calls as the model writes them."""
    return answer_text(message) if message.get("tool_calls") else message["content"]


def mapping_sentences(fmt: str, notes: dict[str, list[int]]) -> list[str]:
    """The report's account of how the file was read: notes maps a note to [lines, count]."""
    sentences = [FORMAT_SENTENCES[fmt]] if fmt in FORMAT_SENTENCES else []
    for note, template in NOTE_SENTENCES.items():
        if note not in notes:
            continue
        lines, count = notes[note]
        sentences.append(
            template.format(
                lines=lines,
                count=count,
                s="" if lines == 1 else "s",
                have="has" if lines == 1 else "have",
                cs="" if count == 1 else "s",
                chave="has" if count == 1 else "have",
                cverb="s" if count == 1 else "",
            )
        )
    return sentences


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
