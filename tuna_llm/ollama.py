"""The Ollama side of an export: a Modelfile whose TEMPLATE, SYSTEM and stop tokens come from the model's own chat
template, and the bundle's README. (The tests check what is written with a parser of Ollama's Modelfile format:
tuna_llm/tests/modelfile.py.)

The TEMPLATE is not written per model. The tokenizer's Jinja chat template is rendered with marker contents, and
the text around each marker gives each role's prefix and suffix, the generation prompt and any default system
prompt. The result is then checked: re-assembled from those parts, several conversations must come out exactly
as the tokenizer renders them, or the derivation is refused. Ollama's format is documented at
https://github.com/ollama/ollama/blob/main/docs/modelfile.mdx and docs/template.md; its parser is
parser/parser.go.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tuna_llm.prompting import TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, TOOLS_INTRO, TOOLS_OUTRO, TOOLS_TEMPLATE_MARK, chat_template_for
from tuna_llm.toolcalls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

ROLES = ("system", "user", "assistant")

# Marker contents: text a template has no reason to rewrite; the invisible separators keep "user-1" from matching
# inside another marker or the template's own text.
_MARK = "\u2063tuna-{}-{}\u2063"


@dataclass(frozen=True)
class ChatTemplateParts:
    """A chat template in prefix/suffix shape: ``start``, then per message ``prefix + content + suffix`` of its role,
    then ``generation_prompt``. ``default_system`` is the system message the template inserts when the
    conversation does not open with one."""

    start: str
    prefixes: Mapping[str, str]
    suffixes: Mapping[str, str]
    generation_prompt: str
    default_system: str | None

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        # The default system message goes in under Ollama's rule (server/routes.go): when the first message of
        # the request is not a system message. The check in derive_chat_template compares this with the tokenizer.
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(self.prefixes[m["role"]] + m["content"] + self.suffixes[m["role"]] for m in messages)
        return self.start + body + (self.generation_prompt if add_generation_prompt else "")


@dataclass(frozen=True)
class OllamaChat:
    """What a Modelfile needs from the chat template: TEMPLATE, SYSTEM (None when the template has no default
    system prompt) and the stop tokens."""

    template: str
    system: str | None
    stops: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------------
# The chat template, taken apart


def derive_chat_template(tokenizer: Any) -> ChatTemplateParts:
    """Take a Hugging Face tokenizer's chat template apart into prefixes and suffixes per role.

    Raises ValueError, naming the part it could not find, for a template that is not in that shape (one that
    folds the system prompt into the first user turn, repeats or rewrites contents, ...)."""
    s, u1, a1, u2 = _MARK.format("system", 1), _MARK.format("user", 1), _MARK.format("assistant", 1), _MARK.format("user", 2)
    conversation = [_msg("system", s), _msg("user", u1), _msg("assistant", a1), _msg("user", u2)]

    text = _apply(tokenizer, conversation, add_generation_prompt=False)
    head, (system_to_user, user_to_assistant, assistant_to_user), user_suffix = _split(text, [s, u1, a1, u2])
    assistant_suffix = _split(_apply(tokenizer, conversation[:3], add_generation_prompt=False), [s, u1, a1])[2]

    # Between two contents is the first one's suffix and then the second one's prefix; a suffix is what follows
    # the last message of a conversation.
    assistant_prefix = _after(user_to_assistant, user_suffix, "the assistant prefix (the user suffix is not followed by it)")
    user_prefix = _after(assistant_to_user, assistant_suffix, "the user prefix (the assistant suffix is not followed by it)")
    system_suffix = _before(system_to_user, user_prefix, "the system suffix (the user prefix does not follow it)")
    generation_prompt = _after(
        _apply(tokenizer, conversation, add_generation_prompt=True), text, "the generation prompt (it is not appended at the end)"
    )

    # Without a system message the opening is either the start text and the user prefix, or a default system
    # message in full and then the user prefix.
    opening = _split(_apply(tokenizer, [_msg("user", u1)], add_generation_prompt=False), [u1])[0]
    start = opening[: len(opening) - len(user_prefix)]
    if opening.endswith(user_prefix) and head.startswith(start):
        default_system, system_prefix = None, head[len(start) :]
    elif opening.startswith(head) and opening.endswith(system_suffix + user_prefix):
        # The template always opens with a system message, so the start text cannot be told apart from the
        # system prefix; it is kept in the prefix, which is exact for every conversation that starts at its head.
        start, system_prefix = "", head
        default_system = opening[len(head) : len(opening) - len(system_suffix + user_prefix)]
    else:
        raise ValueError(
            f"Could not derive the opening of the chat template: without a system message it opens with {opening!r}, "
            f"which is neither the system opening {head!r} nor a default system message."
        )

    parts = ChatTemplateParts(
        start=start,
        prefixes={"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
        suffixes={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
        generation_prompt=generation_prompt,
        default_system=default_system,
    )
    _check_parts(tokenizer, parts)
    return parts


def stop_tokens(tokenizer: Any, parts: ChatTemplateParts) -> tuple[str, ...]:
    """The special tokens that end an assistant message in the template, then the tokenizer's eos token."""
    specials = set(getattr(tokenizer, "all_special_tokens", None) or ())
    specials |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values() if getattr(t, "special", False)}
    specials.discard("")
    found, suffix, i = [], parts.suffixes["assistant"], 0
    while i < len(suffix):
        token = max((t for t in specials if suffix.startswith(t, i)), key=len, default=None)
        if token:
            found.append(token)
        i += len(token) if token else 1
    eos = getattr(tokenizer, "eos_token", None)
    return tuple(dict.fromkeys([*found, *([eos] if eos else [])]))


def ollama_template(parts: ChatTemplateParts, *, tools: bool = False) -> str:
    """The Go template for Ollama: one branch per role inside ``range .Messages``, then the generation prompt.

    With ``tools`` (for LLM Tuna's ChatML-with-tools template, tuna_llm.prompting), the branches also write the
    request's tools at the end of each system turn (``$.Tools``), an assistant turn's calls after its content
    (``.ToolCalls``) and a ``tool`` message as a user turn inside <tool_response></tool_response>, as that Jinja
    template does. Ollama writes the tools' JSON with Go's encoder (no spaces), transformers with Python's."""
    bodies = {role: "{{ .Content }}" for role in ROLES}
    roles = ROLES
    if tools:
        listed = "{{ range $.Tools }}\n{{ json . }}{{ end }}"
        bodies["system"] += f"{{{{ if $.Tools }}}}\n\n{_go_literal(TOOLS_INTRO)}{listed}{_go_literal(TOOLS_OUTRO)}{{{{ end }}}}"
        call = f'{TOOL_CALL_OPEN}\n{{"name": "{{{{ .Function.Name }}}}", "arguments": {{{{ .Function.Arguments }}}}}}\n{TOOL_CALL_CLOSE}'
        bodies["assistant"] += (
            "{{ $content := .Content }}{{ range $i, $call := .ToolCalls }}{{ if or $i $content }}\n{{ end }}" + call + "{{ end }}"
        )
        bodies["tool"] = f"{_go_literal(TOOL_RESPONSE_OPEN)}{{{{ .Content }}}}{_go_literal(TOOL_RESPONSE_CLOSE)}"
        roles = (*ROLES, "tool")
    prefixes = {**parts.prefixes, "tool": parts.prefixes["user"]}
    suffixes = {**parts.suffixes, "tool": parts.suffixes["user"]}
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
        f"{_go_literal(prefixes[role])}{bodies[role]}{_go_literal(suffixes[role])}"
        for i, role in enumerate(roles)
    )
    return f"{_go_literal(parts.start)}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_go_literal(parts.generation_prompt)}"


class _WithTemplate:
    """A tokenizer that renders with another chat template (the one a fine-tune of it is saved with)."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        self._tokenizer, self.chat_template = tokenizer, template

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, messages, **kwargs):
        return self._tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)


def ollama_chat(tokenizer: Any, *, tools: bool = True) -> OllamaChat:
    """TEMPLATE, SYSTEM and stop tokens for a Modelfile, from the tokenizer's chat template.

    With ``tools``, from the template a fine-tune of this base is saved with (tuna_llm.prompting.chat_template_for):
    for LLM Tuna's ChatML-with-tools template, a TEMPLATE that renders tools, tool calls and tool results as it does;
    any other template gives the same TEMPLATE as without ``tools`` (its tool handling is not derived)."""
    template = chat_template_for(tokenizer) if tools and getattr(tokenizer, "chat_template", None) else ""
    source = _WithTemplate(tokenizer, template) if template else tokenizer
    parts = derive_chat_template(source)
    bos = getattr(tokenizer, "bos_token", None)
    if getattr(tokenizer, "add_bos_token", False) and bos and parts.start.startswith(bos):
        # The GGUF converted from this tokenizer says to add BOS, so the runtime adds it; the template must not.
        parts = replace(parts, start=parts.start[len(bos) :])
    go = ollama_template(parts, tools=TOOLS_TEMPLATE_MARK in template)
    return OllamaChat(template=go, system=parts.default_system, stops=stop_tokens(tokenizer, parts))


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _apply(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    roles = ", ".join(m["role"] for m in messages)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2's TemplateError, or a template's own raise_exception
        raise ValueError(f"The chat template could not render a conversation of {roles}: {exc}") from exc
    if not isinstance(text, str):
        raise ValueError(f"The chat template rendered {type(text).__name__}, not text, for {roles}.")
    return text


def _split(text: str, contents: list[str]) -> tuple[str, list[str], str]:
    """The text before the first content, between each two, and after the last."""
    pieces, rest = [], text
    for content in contents:
        if rest.count(content) != 1:
            role = content.split("-")[1]
            raise ValueError(
                f"Could not find the {role} message's content exactly once in the rendered chat template: "
                "the template repeats, drops or rewrites message contents."
            )
        before, rest = rest.split(content)
        pieces.append(before)
    return pieces[0], pieces[1:], rest


def _after(text: str, head: str, what: str) -> str:
    if not text.startswith(head):
        raise ValueError(f"Could not derive {what}: {text!r} does not start with {head!r}.")
    return text[len(head) :]


def _before(text: str, tail: str, what: str) -> str:
    if not text.endswith(tail):
        raise ValueError(f"Could not derive {what}: {text!r} does not end with {tail!r}.")
    return text[: len(text) - len(tail)]


_CHECKS = (
    [_msg("user", "What is 2+2?")],
    [_msg("system", "Answer in French."), _msg("user", "Hi there")],
    [_msg("user", "Hi"), _msg("assistant", "Hello! How can I help?"), _msg("user", "Name a colour.")],
    [_msg("system", "Be brief."), _msg("user", "One"), _msg("assistant", "Two"), _msg("user", "Three")],
)


def _check_parts(tokenizer: Any, parts: ChatTemplateParts) -> None:
    for messages in _CHECKS:
        for add_generation_prompt in (True, False):
            expected = _apply(tokenizer, list(messages), add_generation_prompt=add_generation_prompt)
            derived = parts.render(list(messages), add_generation_prompt=add_generation_prompt)
            if derived != expected:
                roles = ", ".join(m["role"] for m in messages)
                raise ValueError(
                    f"The chat template is not in per-message prefix/suffix form: for a conversation of {roles} it "
                    f"renders {expected!r}, but its derived parts give {derived!r}."
                )


def _go_literal(text: str) -> str:
    # Go templates have no escape for "{{" in literal text; such a template would need an action per brace.
    if "{{" in text:
        raise ValueError(f"The chat template text {text!r} contains '{{{{', which a Go template cannot hold literally.")
    return text


# ---------------------------------------------------------------------------------------------------------------
# The Modelfile


def modelfile(
    chat: OllamaChat,
    *,
    model_file: str,
    adapter_file: str | None = None,
    greedy: bool = True,
    num_ctx: int | None = None,
) -> str:
    """The Modelfile text: FROM the base GGUF and ADAPTER the LoRA GGUF (or FROM a merged GGUF alone), the chat
    template, its default system prompt and stop tokens. Paths are relative to the Modelfile's folder."""
    lines = [
        "# Made by LLM Tuna from the model's own chat template.",
        f"FROM {_path(model_file)}",
    ]
    if adapter_file:
        lines.append(f"ADAPTER {_path(adapter_file)}")
    lines.append(f"TEMPLATE {_quote(chat.template, triple=True)}")
    if chat.system:
        lines.append(f"SYSTEM {_quote(chat.system, triple=True)}")
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in chat.stops]
    if greedy:
        # Greedy decoding, as the platform evaluates; older Ollama releases default to a 1.1 repeat penalty,
        # which would change greedy answers.
        lines += ["PARAMETER temperature 0", "PARAMETER repeat_penalty 1"]
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    return "\n".join(lines) + "\n"


def _path(path: str) -> str:
    if "\n" in path or path != path.strip() or path.startswith('"'):
        raise ValueError(f"A Modelfile cannot name the file {path!r}.")
    # "./" makes a file of the bundle unmistakable: a bare name that is not found is taken as a model's name.
    if path.startswith(("/", "./", "../", "~")):
        return path
    return f"./{path}"


def _quote(value: str, *, triple: bool = False) -> str:
    # Ollama's parser has no escapes: a value ends at the first line end after which its quotes are closed.
    if '"""' in value:
        raise ValueError(f'A Modelfile value cannot contain """: {value!r}.')
    if triple or "\n" in value or '"' in value:
        return f'"""{value}"""'
    return f'"{value}"'


# ---------------------------------------------------------------------------------------------------------------
# The bundle's README


def bundle_readme(
    *,
    name: str,
    base_gguf: str | None = None,
    lora_gguf: str | None = None,
    merged_gguf: str | None = None,
    quantized_ggufs: Sequence[str] = (),
    merged_dir: str | None = None,
    modelfile_name: str | None = "Modelfile",
    parity: Mapping[str, Mapping[str, Any] | str] | None = None,
) -> str:
    """A short README of how to run the bundle's files; each section appears only when its files are there.
    `quantized_ggufs`: the merged model quantized by llama-quantize (merged-q4_k_m.gguf, ...), each with a
    Modelfile.<type> beside it."""
    out = [f"# {name}", "", "A LoRA fine-tune exported by LLM Tuna. Pick one way to run it:", ""]
    if parity:
        out += ["## Parity with PyTorch", "", "The held-out prompts, answered greedily by the export and by PyTorch:", ""]
        out += [f"- {fmt}: {_parity_line(figures)}" for fmt, figures in parity.items()]
        out.append("")
    if base_gguf or merged_gguf or quantized_ggufs:
        out += ["## llama.cpp", "", "```sh"]
        if base_gguf and lora_gguf:
            out += [
                "# the base model with the fine-tune applied",
                f"llama-cli -m {base_gguf} --lora {lora_gguf} --temp 0",
                f"llama-server -m {base_gguf} --lora {lora_gguf} --jinja --port 8080   # OpenAI API on http://localhost:8080/v1",
            ]
        if merged_gguf:
            out += [
                "# or the merged model alone",
                f"llama-cli -m {merged_gguf} --temp 0",
                f"llama-server -m {merged_gguf} --jinja --port 8080",
            ]
        for quantized in quantized_ggufs:
            out += [
                f"# or the merged model quantized ({_quantization(quantized)}): smaller and faster, answers may differ",
                f"llama-server -m {quantized} --jinja --port 8080",
            ]
        out += ["```", ""]
    if modelfile_name:
        out += ["## Ollama", "", "```sh", f"ollama create {_slug(name)} -f {modelfile_name}", f"ollama run {_slug(name)}", "```", ""]
        out.append(f"The {modelfile_name} carries the model's chat template, system prompt and stop tokens.")
        if base_gguf and lora_gguf and merged_gguf:
            out.append(f"To use the merged GGUF instead, replace its FROM and ADAPTER lines with `FROM ./{merged_gguf}`.")
        others = [f"Modelfile.{_quantization(q).lower()}" for q in quantized_ggufs]
        others = [name for name in others if name != modelfile_name]
        if others:
            out.append(
                f"The quantized files have their own: `ollama create {_slug(name)}-<type> -f {others[0]}`"
                + (f" ({', '.join(others)})." if len(others) > 1 else ".")
            )
        out.append("")
    if merged_dir:
        out += [
            "## transformers and vLLM",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{merged_dir}")',
            f'model = AutoModelForCausalLM.from_pretrained("{merged_dir}")',
            'messages = [{"role": "user", "content": "Hello"}]',
            'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=128, do_sample=False)[0]))",
            "```",
            "",
            "```sh",
            f"vllm serve ./{merged_dir}",
            "```",
            "",
        ]
    return "\n".join(out)


def _quantization(filename: str) -> str:
    """ "merged-q4_k_m.gguf" -> "Q4_K_M"."""
    return filename.removesuffix(".gguf").rsplit("-", 1)[-1].upper()


def _parity_line(figures: Mapping[str, Any] | str) -> str:
    if isinstance(figures, str):
        return figures
    known = {"identical", "total", "exact_match_pytorch", "exact_match_gguf", "tokens_per_second_pytorch", "tokens_per_second_gguf"}
    said = []
    known |= {"quantization", "note"}
    if "identical" in figures and "total" in figures:
        said.append(f"{figures['identical']}/{figures['total']} answers identical")
    if figures.get("note"):
        said.append(str(figures["note"]))
    elif isinstance(figures.get("quantization"), Mapping):
        said.append(quantization_note(figures["quantization"], figures.get("identical"), figures.get("total")))
    if "exact_match_gguf" in figures or "exact_match_pytorch" in figures:
        said.append(f"exact match {figures.get('exact_match_gguf', '?')} (GGUF) vs {figures.get('exact_match_pytorch', '?')} (PyTorch)")
    if "tokens_per_second_gguf" in figures or "tokens_per_second_pytorch" in figures:
        said.append(
            f"{_number(figures.get('tokens_per_second_gguf'))} tokens/s (GGUF) vs "
            f"{_number(figures.get('tokens_per_second_pytorch'))} (PyTorch)"
        )
    said += [f"{k} {v}" for k, v in figures.items() if k not in known]
    return "; ".join(said)


def quantization_note(quantization: Mapping[str, Any], identical: int | None, total: int | None) -> str:
    """What a quantized variant's parity figure means, as it is: "a 4-bit model differs: 3 of 32 answers differ"."""
    bits = quantization.get("bits")
    kind = f"a {bits}-bit model" if bits else f"a {quantization.get('type', 'quantized')} model"
    if identical is None or not total:
        return f"{kind} differs"
    differ = int(total) - int(identical)
    note = f"{kind} differs: {differ} of {total} answer{'s' if total != 1 else ''} differ{'s' if differ == 1 else ''}"
    fallbacks = quantization.get("fallbacks") or {}
    if fallbacks:
        count, tensors = sum(fallbacks.values()), quantization.get("tensors")
        widths = ", ".join(str(w) for w in quantization.get("fallback_widths") or [])
        note += (
            f"; llama-quantize kept {count}{f' of {tensors}' if tensors else ''} tensors at a wider type"
            f" (rows{f' {widths} wide' if widths else ''} do not divide into its blocks of 256: "
            + ", ".join(f"{k} x{v}" for k, v in fallbacks.items())
            + ")"
        )
    return note


def _number(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value if value is not None else "?")


def _slug(name: str) -> str:
    # Ollama model names: lower-case letters, digits, "-", "_" and ".".
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"
