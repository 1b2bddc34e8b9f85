"""A parser of Ollama's Modelfile format (parser/parser.go; docs/modelfile.mdx), for the tests: every Modelfile
the export writes (tuna_llm.ollama.modelfile) must parse here as Ollama would read it."""

from __future__ import annotations

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
