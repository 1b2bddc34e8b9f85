"""The llama.cpp runtime (the pinned llama-cpp-python) for exported GGUF models. Django-free.

One `LlamaCppModel` holds one GGUF base model in a process; LoRA GGUF adapters are loaded once and
applied per call, so every fine-tune of a base shares one copy of its weights. At most TUNA_ADAPTER_CACHE_SIZE
adapters stay loaded (the least recently used is freed first; a freed one is loaded again when next asked for). One llama.cpp context
decodes one call at a time: a call waits for it (its queue time), then is billed its own decoding time.
Prompts are rendered by the GGUF's own chat template (what llama.cpp and Ollama users get); temperature
0 decodes greedily; a call ends at an end-of-generation token, a stop string or its token limit.
"""

from __future__ import annotations

import codecs
import ctypes
import dataclasses
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError

from tuna_llm.prompting import ChatTemplateRefused, Message, ToolsUnsupported, has_tool_content, template_tools
from tuna_llm.serving.compute import ComputeThread, compute_thread
from tuna_llm.serving.engine import (
    CallSpec,
    EngineInfo,
    Generation,
    check_fits,
    check_prompt_text,
    check_unicode,
    result_of,
    stream_pieces,
)
from tuna_llm.settings import current

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


_PROBE_NAME, _PROBE_RESULT = "tuna_probe_lookup", "tuna-probe-result-7d1c"


def _renders_tools(formatter) -> bool:
    """Whether a chat template writes a conversation's tools, calls and tool results into the prompt."""
    tools = [{"type": "function", "function": {"name": _PROBE_NAME, "parameters": {"type": "object", "properties": {}}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": _PROBE_NAME, "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Look it up."},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": _PROBE_RESULT},
    ]
    try:
        prompt = formatter(messages=messages, tools=tools).prompt
    except Exception:  # jinja2's errors, or the template's own raise_exception
        return False
    return prompt.count(_PROBE_NAME) >= 2 and _PROBE_RESULT in prompt  # offered and called, and the result


class LlamaCppModel:
    """``adapter_cache_size``: LoRAs kept loaded at most (None: the site's TUNA_ADAPTER_CACHE_SIZE, read at each load)."""

    def __init__(self, gguf: Path, *, n_ctx: int = 4096, n_threads: int | None = None, adapter_cache_size: int | None = None) -> None:
        try:
            import llama_cpp
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
        # The model's vocabulary through llama.cpp's public C API (what llama-cpp-python's private wrappers call).
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

        def text_of(token: int) -> str:
            return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8") if token != -1 else ""

        self.formatter = Jinja2ChatFormatter(
            template=template, eos_token=text_of(self.llm.token_eos()), bos_token=text_of(self.llm.token_bos())
        )
        self.renders_tools = _renders_tools(self.formatter)
        self.lock = threading.Lock()
        self.adapter_cache_size = adapter_cache_size
        self._adapters: OrderedDict[Path, object] = OrderedDict()  # loaded LoRAs, least recently used first
        self._active: Path | None = None

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        """The prompt as the GGUF's chat template renders it (with the conversation's tools: a
        tuna_llm.prompting.Conversation), tokenized as llama.cpp's chat path does. ToolsUnsupported for tool
        content the GGUF's template does not render."""
        if has_tool_content(messages) and not self.renders_tools:
            raise ToolsUnsupported(
                f"The chat template in {self.path.name} does not render tools or tool calls; export the fine-tune again "
                "so that its GGUF carries LLM Tuna's tools-capable template."
            )
        try:  # the tools as render_chat gives them
            rendered = self.formatter(messages=list(messages), tools=template_tools(messages))
        except (TemplateError, ValueError) as exc:  # llama-cpp-python's raise_exception raises a ValueError
            raise ChatTemplateRefused(str(exc) or type(exc).__name__) from None
        check_unicode(rendered.prompt)  # tools and call arguments too, not only the messages' content
        return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def call_tokens(self, call: LlamaCall) -> list[int]:
        """A call's prompt tokens: its messages through the chat template, or its raw text as it is."""
        if call.text is None:
            return self.prompt_tokens(call.messages)
        return self.llm.tokenize(call.text.encode("utf-8"), add_bos=False, special=True)

    # -- adapters -------------------------------------------------------------------------------
    @property
    def loaded_adapters(self) -> list[Path]:
        """The LoRA GGUFs loaded now, least recently used first."""
        return list(self._adapters)

    def _cache_size(self) -> int:
        size = self.adapter_cache_size if self.adapter_cache_size is not None else current().adapter_cache_size
        return max(1, size)

    def _adapter(self, path: Path):
        """The loaded LoRA at ``path`` (loaded now if it is not), marked most recently used."""
        import llama_cpp

        if path in self._adapters:
            self._adapters.move_to_end(path)
            return self._adapters[path]
        if not path.is_file():
            raise FileNotFoundError(f"The LoRA GGUF {path} does not exist.")
        adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode("utf-8"))
        if not adapter:
            raise ValueError(f"llama.cpp could not load the LoRA GGUF {path.name}.")
        self._adapters[path] = adapter
        return adapter

    def _evict(self) -> None:
        """Free the least recently used LoRAs beyond the cache size. Only the active one is applied to the context
        (``_activate`` applies before it evicts), and it is the most recently used, so none freed is in use."""
        import llama_cpp

        while len(self._adapters) > self._cache_size():
            path, adapter = next(iter(self._adapters.items()))
            if path == self._active:
                break
            del self._adapters[path]
            llama_cpp.llama_adapter_lora_free(adapter)

    def _activate(self, lora: Path | None) -> None:
        """Apply `lora` (or none) to the context; prompt state cached under another adapter is dropped."""
        import llama_cpp

        if lora == self._active:
            if lora is not None:
                self._adapters.move_to_end(lora)
            return
        if lora is None:
            failed = llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter(lora))
            scales = (ctypes.c_float * 1)(1.0)
            failed = llama_cpp.llama_set_adapters_lora(self.llm.ctx, adapters, 1, scales)
        if failed:
            raise ValueError(f"llama.cpp could not apply the adapter {lora.name if lora else '(none)'}.")
        self.llm.reset()
        memory = llama_cpp.llama_get_memory(self.llm.ctx)
        if memory is not None:
            llama_cpp.llama_memory_clear(memory, True)
        self._active = lora
        self._evict()

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
            vocab = model.vocab
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


class LlamaHandle:
    """A call submitted to a ``LlamaCppEngine`` (see tuna_llm.serving.engine.Handle)."""

    def __init__(self, call: LlamaCall) -> None:
        self.call = call
        self.deltas: queue.Queue = queue.Queue()
        self.done = threading.Event()
        self.result: Generation | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.compute_s = 0.0  # the time of its own ticks: what it is billed
        self.stream: LlamaStream | None = None


class LlamaCppEngine:
    """One GGUF base model served on the process's device thread (tuna_llm.serving.compute), loaded there:
    calls decode one at a time, in order, one token per tick (so a transformers engine of the same process
    steps in between). A call is billed the time of its own ticks; the wait before its first is queue time."""

    def __init__(self, gguf: Path, *, thread: ComputeThread = compute_thread, **model_options) -> None:
        self.model = thread.call(lambda: LlamaCppModel(gguf, **model_options))
        self._thread = thread
        self._lock = threading.Lock()
        self._queue: deque[LlamaHandle] = deque()
        self._current: LlamaHandle | None = None
        self.last_call_s = 1.0
        thread.add(self)

    # -- the engine interface (tuna_llm.serving.engine) -----------------------------------------
    def describe(self) -> EngineInfo:
        return EngineInfo(ENGINE_NAME, "gguf", "cpu")

    def prepare(self, spec: CallSpec) -> LlamaCall:
        """The checks of the transformers engine, with the GGUF's own chat template, tokenizer and context."""
        if spec.messages is None:
            check_prompt_text(spec.text)
        else:
            check_unicode("".join(m.get("content") or "" for m in spec.messages))
        call = LlamaCall(
            messages=spec.messages or [],
            text=spec.text if spec.messages is None else None,
            lora=Path(spec.adapter.path) if spec.adapter else None,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            seed=spec.seed,
            stop=tuple(spec.stop),
        )
        context = self.model.llm.n_ctx()
        prompt_tokens = len(self.model.call_tokens(call))
        check_fits(prompt_tokens, context, spec.max_prompt_tokens)
        # The answer ends where the context does (finish_reason "length"): llama.cpp cannot decode past it.
        call.max_tokens = min(call.max_tokens, context - prompt_tokens)
        return call

    def submit(self, call: LlamaCall) -> LlamaHandle:
        return self.submit_all([call])[0]

    def submit_all(self, calls: list[LlamaCall]) -> list[LlamaHandle]:
        handles = [LlamaHandle(call) for call in calls]
        with self._lock:
            self._queue.extend(handles)
        self._thread.wake()
        return handles

    def stream(self, handle: LlamaHandle) -> Iterator[str]:
        return stream_pieces(self, handle)

    def cancel(self, handle: LlamaHandle) -> None:
        """Still queued, it ends now; decoding, at its next token (finish_reason "cancelled")."""
        with self._lock:
            handle.cancelled = True
            queued = handle in self._queue
            if queued:
                self._queue.remove(handle)
        if queued:
            waited = (time.perf_counter() - handle.submitted) * 1000
            self._end(handle, Generation("", 0, 0, 0.0, waited, 0.0, "cancelled"))

    def wait_estimate_s(self, rows: int = 1) -> float:
        """Calls decode one at a time: those ahead, and these, at the last call's duration."""
        with self._lock:
            busy = len(self._queue) + (self._current is not None)
        return (busy + rows) * self.last_call_s

    def chat(self, call: LlamaCall) -> Generation:
        return result_of(self.submit(call))

    # -- on the device thread -------------------------------------------------------------------
    def due_in(self, now: float) -> float | None:
        with self._lock:
            return 0.0 if self._current is not None or self._queue else None

    def tick(self) -> None:
        """Decode the current call's next piece (starting the next call first when none is current)."""
        with self._lock:
            if self._current is None:
                if not self._queue:
                    return
                self._current = self._queue.popleft()
            handle = self._current
        try:
            if handle.stream is None:
                handle.started = time.perf_counter()
                handle.stream = self.model.stream(handle.call)
            started = time.perf_counter()
            try:
                if handle.cancelled:
                    handle.stream.close()
                    raise StopIteration
                piece = next(handle.stream)
            finally:
                handle.compute_s += time.perf_counter() - started
            handle.deltas.put(piece)
        except StopIteration:
            self._finished(handle)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller; the device thread goes on
            if handle.stream is not None:
                handle.stream.close()
            self._fail(handle, exc)

    def _finished(self, handle: LlamaHandle) -> None:
        result = handle.stream.result if handle.stream is not None else None
        queue_ms = ((handle.started or time.perf_counter()) - handle.submitted) * 1000
        if result is None:  # closed before it decoded anything
            result = Generation("", 0, 0, 0.0, queue_ms, 0.0, "cancelled")
        else:
            result = dataclasses.replace(result, queue_ms=queue_ms, compute_ms=handle.compute_s * 1000)
            if handle.compute_s > 0:
                self.last_call_s = handle.compute_s
        self._end(handle, result)

    def _fail(self, handle: LlamaHandle, error: BaseException) -> None:
        handle.error = error
        self._release(handle)

    def _end(self, handle: LlamaHandle, result: Generation) -> None:
        handle.result = result
        self._release(handle)

    def _release(self, handle: LlamaHandle) -> None:
        """The handle is done (its result or error set): free the engine and wake its readers."""
        with self._lock:
            if self._current is handle:
                self._current = None
        handle.deltas.put(None)
        handle.done.set()


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
