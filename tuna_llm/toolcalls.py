"""Tool calls as text and as OpenAI objects: the Hermes/Qwen ``<tool_call>`` convention that LLM Tuna's
tools-capable chat template writes (tuna_llm.prompting), read back from a model's answer, and compared.

A call in an answer reads ``<tool_call>\\n{"name": "get_weather", "arguments": {"city":"Paris"}}\\n</tool_call>``;
its arguments are canonical JSON (``canonical_arguments``), so one call is always written the same way.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.S)


def canonical_arguments(arguments: str | dict) -> str:
    """A call's arguments as canonical JSON: keys sorted, no spaces, non-ASCII kept (as Go's encoding/json, which
    Ollama uses to write them, except for its escaping of <, > and &). Raises ValueError unless they are one JSON
    object."""
    value = arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments are not a JSON object: {arguments[:200]!r} is not valid JSON ({exc.msg}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"arguments are not a JSON object: {json.dumps(value)[:200]} is a JSON {type(value).__name__}.")
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def tool_call_text(name: str, arguments: str | dict) -> str:
    """One call as the chat template writes it inside an assistant turn."""
    return f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": {canonical_arguments(arguments)}}}\n{TOOL_CALL_CLOSE}'


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text outside the calls, stripped; the calls as [{"name", "arguments": dict}]) from a model's answer.

    White space around a call's JSON is tolerated; a block that is not a JSON object with a string "name" and an
    object (or JSON-object string) "arguments" is not a call and stays in the content as it was written."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    at = 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1))
        if call is None:
            continue
        kept.append(text[at : match.start()])
        calls.append(call)
        at = match.end()
    kept.append(text[at:])
    content = "".join(kept).strip() if calls else text.strip()
    return content, calls


def _call(body: str) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": value["name"], "arguments": arguments}


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls in OpenAI's message shape, each with a fresh id and its arguments as a (canonical) JSON string."""
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": canonical_arguments(call["arguments"])},
        }
        for call in calls
    ]


def calls_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An OpenAI assistant message's calls (``tool_calls``, or the legacy ``function_call``) as
    [{"name", "arguments"}]; arguments that are not a JSON object are kept as the string they were."""
    raw = message.get("tool_calls") or ([{"function": message["function_call"]}] if message.get("function_call") else [])
    calls = []
    for call in raw:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(canonical_arguments(arguments))
            except ValueError:
                pass
        calls.append({"name": function.get("name", ""), "arguments": arguments})
    return calls


def calls_match(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> bool:
    """The same calls: names and arguments compared as JSON (key order and spacing ignored), in any order, each
    as often."""
    return Counter(map(_call_key, expected)) == Counter(map(_call_key, got))


def _call_key(call: dict[str, Any]) -> tuple[str, str]:
    arguments = call.get("arguments", {})
    try:
        return call.get("name", ""), canonical_arguments(arguments)
    except ValueError:
        return call.get("name", ""), str(arguments)
