"""Parity of an export: the same held-out prompts, greedy, through PyTorch (transformers + peft, what the
platform trained and evaluated) and through the exported GGUF in the engine that serves it (llama-server,
tuna_llm.serving.llama_server, with the GGUF's own chat template). Identical answers are counted, never assumed;
every mismatch is kept, side by side. Django-free.

PyTorch's answers are decoded as one continuously batched call, as evaluation and serving decode
(tuna_llm.serving: a row's answer does not depend on its batch, so each is the answer it gets alone). The GGUF's
are asked one prompt at a time, greedy, through the Engine interface: the same calls serving makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tuna_llm import metrics
from tuna_llm.prompting import Message, answer_text, render_chat
from tuna_llm.serving.batching import GenerationRequest, decode_all
from tuna_llm.serving.engine import Adapter, CallSpec, Engine, Generation, result_of
from tuna_llm.serving.registry import LoadedBaseModel

MISMATCHES_KEPT = 20


def pytorch_answers(
    loaded: LoadedBaseModel,
    examples: Sequence[list[Message]],
    adapter: str | None,
    budget: int,
    progress: Callable[[int], None] = lambda done: None,
) -> list[Generation]:
    """Greedy answers to each example's conversation (its last message, the reference, left out) through
    ``adapter`` (attached to ``loaded``; None: the base model), all decoded in one batched call."""
    requests = [
        GenerationRequest(
            text=render_chat(loaded.tokenizer, messages[:-1], add_generation_prompt=True), max_new_tokens=budget, adapter=adapter
        )
        for messages in examples
    ]
    ended = 0

    def on_end(request: GenerationRequest) -> None:
        nonlocal ended
        ended += 1
        progress(ended)

    decode_all(loaded, requests, on_end=on_end)
    for request in requests:
        if request.error is not None:
            raise request.error
    return [request.result for request in requests]


def gguf_answers(
    engine: Engine,
    examples: Sequence[list[Message]],
    budget: int,
    adapter: Adapter | None = None,
    progress: Callable[[int], None] = lambda done: None,
) -> list[Generation]:
    """Greedy answers of `engine` (with `adapter`, e.g. the job's LoRA GGUF) to each example's conversation, its
    last message left out, one prompt at a time."""
    answers = []
    for index, messages in enumerate(examples):
        request = engine.prepare(CallSpec(messages=messages[:-1], max_tokens=budget, temperature=0.0, adapter=adapter))
        answers.append(result_of(engine.submit(request)))
        progress(index + 1)
    return answers


def _tokens_per_second(answers: Sequence[Generation]) -> float | None:
    seconds = sum(a.compute_ms for a in answers) / 1000
    return round(sum(a.completion_tokens for a in answers) / seconds, 1) if seconds > 0 else None


def parity_report(
    examples: Sequence[list[Message]], pytorch: Sequence[Generation], gguf: Sequence[Generation], *, label: str
) -> dict[str, Any]:
    """Counts and speeds for one GGUF variant, with the differing answers side by side."""
    identical, mismatches = 0, []
    for index, (messages, torch_answer, gguf_answer) in enumerate(zip(examples, pytorch, gguf, strict=True)):
        if metrics.normalise(torch_answer.text) == metrics.normalise(gguf_answer.text):
            identical += 1
        elif len(mismatches) < MISMATCHES_KEPT:
            mismatches.append(
                {
                    "index": index,
                    "prompt": messages[-2]["content"] if len(messages) > 1 else "",
                    "reference": answer_text(messages[-1]),
                    "pytorch": torch_answer.text,
                    "gguf": gguf_answer.text,
                }
            )
    references = [answer_text(messages[-1]) for messages in examples]  # a tool call as the template writes it
    return {
        "gguf": label,
        "identical": identical,
        "total": len(examples),
        "exact_match_pytorch": sum(metrics.exact_match(a.text, r) for a, r in zip(pytorch, references, strict=True)),
        "exact_match_gguf": sum(metrics.exact_match(a.text, r) for a, r in zip(gguf, references, strict=True)),
        "tokens_per_second_pytorch": _tokens_per_second(pytorch),
        "tokens_per_second_gguf": _tokens_per_second(gguf),
        "mismatches": mismatches,
    }
