"""A parser of Ollama's Modelfile format (parser/parser.go; docs/modelfile.mdx), for the tests: every Modelfile
the export writes (tuna_llm.ollama.modelfile) must parse here as Ollama would read it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tuna_llm.ollama import ROLES

INSTRUCTIONS = ("from", "parameter", "template", "system", "adapter", "license", "message", "requires")
# The documented PARAMETER names (docs/modelfile.mdx) and the other options Ollama's API accepts (api/types.go),
# with the type of value each takes.
PARAMETERS = {
    "num_ctx": int,
    "repeat_last_n": int,
    "repeat_penalty": float,
    "temperature": float,
    "seed": int,
    "stop": str,
    "num_predict": int,
    "draft_num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    # accepted by the API as well, though not in the table
    "num_keep": int,
    "typical_p": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "num_thread": int,
    "use_mmap": bool,
}
MESSAGE_ROLES = ROLES


@dataclass(frozen=True)
class ModelfileCommand:
    name: str  # the instruction, lower case: "from", "parameter", "template", ...
    args: str  # the value, unquoted
    line: int
    key: str | None = None  # the parameter's name, or the message's role


@dataclass(frozen=True)
class Modelfile:
    commands: tuple[ModelfileCommand, ...]

    def values(self, name: str) -> list[str]:
        return [c.args for c in self.commands if c.name == name]

    def value(self, name: str) -> str | None:
        """The last value of an instruction given once (Ollama keeps the last TEMPLATE, SYSTEM, ...)."""
        found = self.values(name)
        return found[-1] if found else None

    @property
    def parameters(self) -> dict[str, list[str]]:
        params: dict[str, list[str]] = {}
        for command in self.commands:
            if command.name == "parameter":
                params.setdefault(command.key, []).append(command.args)
        return params


def parse_modelfile(text: str) -> Modelfile:
    """Parse a Modelfile as Ollama does (parser/parser.go), stricter where Ollama would fail later: unknown
    PARAMETER names and values of the wrong type are refused here. Raises ValueError with the line number."""
    lines = text.splitlines()
    commands: list[ModelfileCommand] = []
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].lstrip()
        i += 1
        if not line.strip() or line.startswith("#"):
            continue
        word, rest = re.match(r"(\S+)(.*)$", line).groups()
        name = word.lower()
        if name not in INSTRUCTIONS:
            expected = ", ".join(n.upper() for n in INSTRUCTIONS)
            raise ValueError(f"Modelfile line {number}: unknown instruction {word!r}; expected one of {expected}.")
        if rest and not rest[0].isspace():
            raise ValueError(f"Modelfile line {number}: {word.upper()} must be followed by a space.")
        key = None
        if name in ("parameter", "message"):
            key, rest = re.match(r"\s*(\S*)(.*)$", rest).groups()
            if name == "parameter" and key not in PARAMETERS:
                raise ValueError(f"Modelfile line {number}: unknown PARAMETER {key!r}; Ollama knows {', '.join(PARAMETERS)}.")
            if name == "message" and key not in MESSAGE_ROLES:
                raise ValueError(f"Modelfile line {number}: MESSAGE role must be one of {', '.join(MESSAGE_ROLES)}, not {key!r}.")
        # A value ends at the first line end after which its quotes are closed; what it holds is kept as written.
        buffer = rest
        while (value := _unquote(buffer.strip())) is None:
            if i >= len(lines):
                kind = "triple-quoted" if buffer.strip().startswith('"""') else "quoted"
                raise ValueError(f"Modelfile line {number}: unterminated {kind} value for {word.upper()}.")
            buffer += "\n" + lines[i]
            i += 1
        if not value.strip() and name in ("from", "adapter", "parameter", "requires"):
            raise ValueError(f"Modelfile line {number}: {word.upper()} needs a value.")
        if name == "parameter":
            _check_parameter(key, value, number)
        commands.append(ModelfileCommand(name=name, args=value, line=number, key=key))
    if not any(c.name == "from" for c in commands):
        raise ValueError("Modelfile has no FROM line: it needs FROM <model, GGUF file or folder>.")
    return Modelfile(commands=tuple(commands))


def _unquote(value: str) -> str | None:
    """The value inside its quotes, or None while a quote is open (as Ollama's unquote)."""
    if value.startswith('"""'):
        return value[3:-3] if len(value) >= 6 and value.endswith('"""') else None
    if value.startswith('"'):
        return value[1:-1] if len(value) >= 2 and value.endswith('"') else None
    return value


def _check_parameter(key: str, value: str, number: int) -> None:
    kind = PARAMETERS[key]
    try:
        if kind is int:
            int(value)
        elif kind is float:
            float(value)
        elif kind is bool and value.lower() not in ("true", "false"):
            raise ValueError(value)
    except ValueError:
        raise ValueError(f"Modelfile line {number}: PARAMETER {key} takes {kind.__name__}, not {value!r}.") from None


# ---------------------------------------------------------------------------------------------------------------
# Ollama's prompt: the part of Go's text/template that Modelfile TEMPLATEs use, with Ollama's data and functions
# (server/prompt.go, template/template.go): .Messages (Role, Content, ToolCalls[].Function.Name/.Arguments),
# .Tools, .System; the functions json, eq, ne, and, or, not, len, index, slice.

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def ollama_prompt(template: str, messages: list[dict], *, system: str | None = None, tools: list[dict] | None = None) -> str:
    """The prompt Ollama builds for a chat request from OpenAI-shaped messages: the Modelfile's SYSTEM when the
    request opens without a system message, consecutive messages of one role merged (tool results never), tool
    calls' arguments parsed from their JSON strings, then the TEMPLATE executed."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + (m.get("content") or "")
            continue
        calls = [
            {"Function": {"Name": c["function"]["name"], "Arguments": json.loads(c["function"]["arguments"] or "{}")}}
            for c in m.get("tool_calls") or []
        ]
        collated.append({"Role": m["role"], "Content": m.get("content") or "", "ToolCalls": calls})
    return render_go_template(template, {"Messages": collated, "Tools": tools or [], "System": system or ""})


def go_json(value) -> str:
    """Go's encoding/json: no spaces, map keys sorted, <, > and & escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_go_template(template: str, data: dict) -> str:
    nodes, stop = _go_parse(_go_tokens(template), [0])
    if stop is not None:
        raise ValueError(f"unexpected {{{{ {stop} }}}}")
    out: list[str] = []
    _go_run(nodes, data, [{"$": data}], out)
    return "".join(out)


def _go_tokens(template: str) -> list[tuple[str, str]]:
    tokens, at = [], 0
    for match in _ACTION.finditer(template):
        text = template[at : match.start()]
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        tokens += [("text", text), ("action", match.group(2))]
        at = match.end()
        if match.group(3):
            while at < len(template) and template[at] in " \t\r\n":
                at += 1
    tokens.append(("text", template[at:]))
    return tokens


def _go_parse(tokens, at):
    """Nodes up to {{ end }} / {{ else ... }}; returns them and the action that stopped them."""
    nodes = []
    while at[0] < len(tokens):
        kind, value = tokens[at[0]]
        at[0] += 1
        if kind == "text":
            nodes.append(("text", value))
        elif value == "end" or value == "else" or value.startswith("else "):
            return nodes, value
        elif value.startswith(("if ", "range ")):
            keyword, rest = value.split(" ", 1)
            branches = []
            while True:
                body, stop = _go_parse(tokens, at)
                branches.append((rest, body))
                if stop == "end":
                    break
                if stop is None:
                    raise ValueError(f"{{{{ {value} }}}} has no {{{{ end }}}}")
                rest = stop[len("else if ") :] if stop.startswith("else if ") else None
            nodes.append((keyword, branches))
        else:
            nodes.append(("action", value))
    return nodes, None


def _truth(value) -> bool:
    return value is not None and value is not False and value != 0 and value != "" and not (isinstance(value, (list, dict)) and not value)


def _go_run(nodes, dot, scopes, out) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            value = _statement(node[1], dot, scopes)
            if value is not None:
                out.append(value if isinstance(value, str) else go_json(value) if isinstance(value, (dict, list)) else str(value))
        elif kind == "if":
            for condition, body in node[1]:
                if condition is None or _truth(_pipeline(condition, dot, scopes)):
                    _go_run(body, dot, [*scopes, {}], out)
                    break
        elif kind == "range":
            (head, body), *rest = node[1]
            names, _, pipe = head.rpartition(":=")
            items = _pipeline(pipe, dot, scopes)
            names = [n.strip() for n in names.split(",") if n.strip()]
            for index, item in enumerate(items or []):
                scope = dict(zip(names, [index, item] if len(names) == 2 else [item], strict=True)) if names else {}
                _go_run(body, item, [*scopes, scope], out)
            if not items and rest:
                _go_run(rest[0][1], dot, [*scopes, {}], out)


def _statement(text: str, dot, scopes):
    declared = re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.*)", text, re.S)
    if declared:
        name, op, pipe = declared.groups()
        value = _pipeline(pipe, dot, scopes)
        if op == ":=":
            scopes[-1][name] = value
        else:
            next(s for s in reversed(scopes) if name in s)[name] = value
        return None
    return _pipeline(text, dot, scopes)


def _pipeline(text: str, dot, scopes):
    tokens = _TOKEN.findall(text)
    value, at = _command(tokens, 0, dot, scopes)
    if at != len(tokens):
        raise ValueError(f"cannot read {{{{ {text} }}}}")
    return value


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": len,
    "index": lambda a, *keys: _index(a, keys),
    "slice": lambda a, i=0, j=None: a[i:j],
    "json": go_json,
}


def _index(value, keys):
    for key in keys:
        value = value[key]
    return value


def _command(tokens, at, dot, scopes):
    """A function call with its arguments up to the end or a ")" (and, or short-circuit), or one operand."""
    name = tokens[at]
    if name in _FUNCS or name in ("and", "or"):
        args, at = [], at + 1
        while at < len(tokens) and tokens[at] != ")":
            arg, at = _operand(tokens, at, dot, scopes)
            args.append(arg)
        if name == "and":
            return next((a for a in args if not _truth(a)), args[-1]), at
        if name == "or":
            return next((a for a in args if _truth(a)), args[-1]), at
        return _FUNCS[name](*args), at
    return _operand(tokens, at, dot, scopes)


def _operand(tokens, at, dot, scopes):
    token = tokens[at]
    if token == "(":
        value, at = _command(tokens, at + 1, dot, scopes)
        if tokens[at] != ")":
            raise ValueError("unclosed (")
        return value, at + 1
    if token.startswith('"'):
        return json.loads(token), at + 1
    if re.fullmatch(r"-?\d+", token):
        return int(token), at + 1
    if token.startswith("$"):
        name, _, path = token.partition(".")
        value = next(s[name] for s in reversed(scopes) if name in s)
        return _fields(value, path), at + 1
    if token.startswith("."):
        return _fields(dot, token[1:]), at + 1
    raise ValueError(f"unknown word {token!r}")


def _fields(value, path: str):
    for field in filter(None, path.split(".")):
        value = value[field]
    return value
