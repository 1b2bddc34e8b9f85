"""Token counting for dataset statistics, without torch.

The web process validates uploads, and importing transformers' tokenizer classes pulls in torch
(~300 MB). This reads the same tokenizer.json and chat template with the light ``tokenizers`` and
``jinja2`` packages. Per example it counts the content tokens plus the template's overhead for that
sequence of roles, measured once by rendering the real template (a test checks the figures against
transformers' own rendering). A conversation with tools or tool calls is counted whole, rendered by
tuna_llm.prompting.render_chat with a transformers tokenizer read from the same files (transformers'
tokenizer classes no longer import torch), loaded the first time such a conversation comes.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tuna_llm.catalog import BaseModelSpec
from tuna_llm.settings import current

_PLACEHOLDER = "x"


class TemplateRefused(ValueError):
    """The chat template refuses these messages (its own raise_exception message, or why it failed)."""


def _raise_exception(message: str):
    raise TemplateRefused(message)


class TokenCounter:
    def __init__(self, model_dir: Path) -> None:
        import tokenizers
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self._model_dir = model_dir
        self._hf_tokenizer = None
        self._tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        template = _read_chat_template(model_dir)
        self._template = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            self._template = env.from_string(template)
        self._overheads: dict[tuple[str, ...], int] = {}

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def template_overhead(self, roles: tuple[str, ...]) -> int:
        """Tokens the chat template adds around messages with these roles."""
        if roles not in self._overheads:
            messages = [{"role": role, "content": _PLACEHOLDER} for role in roles]
            rendered = self.render(messages)
            self._overheads[roles] = self.count(rendered) - len(roles) * self.count(_PLACEHOLDER)
        return self._overheads[roles]

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._template is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=False, bos_token="", eos_token="")
        except TemplateError as exc:
            raise TemplateRefused(str(exc)) from None

    def tools_unsupported_reason(self) -> str | None:
        """None when this model's chat can render tools and tool calls; otherwise why not, in plain words."""
        from tuna_llm.prompting import tools_unsupported_reason

        return tools_unsupported_reason(self.hf_tokenizer())

    def count_chat(self, messages: list[dict]) -> int:
        """Tokens of a whole conversation rendered as training renders it, tools and tool calls included.

        Raises a ValueError (tuna_llm.prompting.ToolsUnsupported, TemplateRefused) when it cannot be rendered.
        """
        from jinja2 import TemplateError

        from tuna_llm.prompting import render_chat

        try:
            text = render_chat(self.hf_tokenizer(), messages, add_generation_prompt=False)
        except TemplateError as exc:
            raise TemplateRefused(str(exc)) from None
        return self.count(text)

    def hf_tokenizer(self):
        """A transformers tokenizer from the same files (no weights, no torch), for rendering with tools."""
        if self._hf_tokenizer is None:
            from transformers import PreTrainedTokenizerFast

            self._hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(self._model_dir))
        return self._hf_tokenizer


def _read_chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


@lru_cache(maxsize=4)
def token_counter_for(spec: BaseModelSpec) -> TokenCounter:
    if spec.kind == "embedded":
        from tuna_llm.loading import prepare_embedded_model

        return TokenCounter(prepare_embedded_model(spec))
    if spec.kind == "local":
        return TokenCounter(Path(spec.load_path))
    from huggingface_hub import snapshot_download

    directory = snapshot_download(
        spec.source, allow_patterns=["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"], token=current().hf_token
    )
    return TokenCounter(Path(directory))
