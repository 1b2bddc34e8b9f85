"""The llama.cpp runtime (the pinned llama-cpp-python) for exported GGUF models. Django-free.

One `LlamaCppModel` holds one GGUF base model in a process; LoRA GGUF adapters are loaded once and
applied per call, so every fine-tune of a base shares one copy of its weights. One llama.cpp context
decodes one call at a time: a call waits for it (its queue time), then is billed its own decoding time.
Prompts are rendered by the GGUF's own chat template (what llama.cpp and Ollama users get); temperature
0 decodes greedily; a call ends at an end-of-generation token, a stop string or its token limit.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tuna_llm.serving.engine import Generation
from tuna_llm.prompting import Message

ENGINE_NAME = "llama.cpp"


class LlamaCppUnavailable(RuntimeError):
    pass


@dataclass
class LlamaCall:
    messages: list[Message]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    lora: Path | None = None
    text: str | None = None  # a raw prompt, used as it is instead of the chat template (messages unused)


class LlamaCppModel:
    def __init__(self, gguf: Path, *, n_ctx: int = 4096, n_threads: int | None = None) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise LlamaCppUnavailable("llama-cpp-python is not installed: run `make install`.") from exc
        self.path = Path(gguf)
        threads = n_threads or max(1, os.cpu_count() or 1)
        self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.path.name} has no chat template in its metadata.")
        model = self.llm._model
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() != -1 else "",
            bos_token=model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() != -1 else "",
        )
        self.lock = threading.Lock()
        self._adapters: dict[Path, object] = {}
        self._active: Path | None = None

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        """The prompt as the GGUF's chat template renders it, tokenized as llama.cpp's chat path does."""
        rendered = self.formatter(messages=messages)
        return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def call_tokens(self, call: LlamaCall) -> list[int]:
        """A call's prompt tokens: its messages through the chat template, or its raw text as it is."""
        if call.text is None:
            return self.prompt_tokens(call.messages)
        return self.llm.tokenize(call.text.encode("utf-8"), add_bos=False, special=True)

    # -- adapters -------------------------------------------------------------------------------
    def _adapter(self, path: Path):
        import llama_cpp

        if path not in self._adapters:
            if not path.is_file():
                raise FileNotFoundError(f"The LoRA GGUF {path} does not exist.")
            adapter = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(path).encode("utf-8"))
            if not adapter:
                raise ValueError(f"llama.cpp could not load the LoRA GGUF {path.name}.")
            self._adapters[path] = adapter
        return self._adapters[path]

    def _activate(self, lora: Path | None) -> None:
        """Apply `lora` (or none) to the context; prompt state cached under another adapter is dropped."""
        import llama_cpp

        if lora == self._active:
            return
        if lora is None:
            failed = llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter(lora))
            scales = (ctypes.c_float * 1)(1.0)
            failed = llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, scales)
        if failed:
            raise ValueError(f"llama.cpp could not apply the adapter {lora.name if lora else '(none)'}.")
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self._active = lora

    # -- calls ----------------------------------------------------------------------------------
    def chat(self, call: LlamaCall) -> Generation:
        stream = self.stream(call)
        for _ in stream:
            pass
        return stream.result

    def stream(self, call: LlamaCall) -> LlamaStream:
        return LlamaStream(self, call)


class LlamaStream:
    """The text pieces of one call as llama.cpp decodes them; `result` (a Generation) once it ended.
    Closing it early stops decoding (finish_reason "cancelled")."""

    def __init__(self, model: LlamaCppModel, call: LlamaCall) -> None:
        self.model, self.call = model, call
        self.result: Generation | None = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def _run(self) -> Iterator[str]:
        import llama_cpp

        model, call = self.model, self.call
        submitted = time.perf_counter()
        with model.lock:
            started = time.perf_counter()
            model._activate(call.lora)
            prompt = model.call_tokens(call)
            if len(prompt) + call.max_tokens > model.llm.n_ctx():
                raise ValueError(
                    f"The prompt ({len(prompt)} tokens) and max_tokens ({call.max_tokens}) do not fit the context ({model.llm.n_ctx()})."
                )
            greedy = call.temperature <= 0
            if not greedy:
                model.llm.set_seed(call.seed if call.seed is not None else int(time.time_ns() % 2**31))
            vocab = model.llm._model.vocab
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            text, emitted, generated, finish = "", 0, [], "cancelled"
            try:
                for token in model.llm.generate(
                    prompt,
                    top_k=1 if greedy else 0,
                    top_p=1.0 if greedy else call.top_p,
                    min_p=0.0,
                    temp=0.0 if greedy else call.temperature,
                    repeat_penalty=1.0,
                    reset=True,
                ):
                    if llama_cpp.llama_vocab_is_eog(vocab, token):
                        finish = "stop"
                        break
                    generated.append(token)
                    text += decoder.decode(model.llm.detokenize([token], prev_tokens=prompt + generated[:-1]))
                    cut = _first_stop(text, call.stop)
                    if cut is not None:
                        text, finish = text[:cut], "stop"
                    safe = len(text) if cut is not None else _safe_length(text, call.stop)
                    if safe > emitted:
                        yield text[emitted:safe]
                        emitted = safe
                    if cut is not None:
                        break
                    if len(generated) >= call.max_tokens:
                        finish = "length"
                        break
                if finish != "cancelled" and len(text) > emitted:
                    yield text[emitted:]
            finally:
                now = time.perf_counter()
                self.result = Generation(
                    text=text.strip(),
                    prompt_tokens=len(prompt),
                    completion_tokens=len(generated),
                    latency_ms=(now - started) * 1000,
                    queue_ms=(started - submitted) * 1000,
                    compute_ms=(now - started) * 1000,
                    finish_reason=finish,
                )


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(stop) for stop in stops if stop and stop in text]
    return min(found) if found else None


def _safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent: all but a tail that could still become a stop string."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return len(text) - hold
