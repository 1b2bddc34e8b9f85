"""Generation on a loaded base model, with or without an adapter. Django-free."""

from __future__ import annotations

from dataclasses import dataclass

from tuna_llm.prompting import Message, render_chat
from tuna_llm.registry import LoadedBaseModel


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # from the start of its prefill to its own end
    queue_ms: float  # waiting to be admitted, before latency_ms starts
    compute_ms: float  # its share of the steps it was decoded in: what it is billed
    finish_reason: str  # "stop", "length", or "cancelled" (its client went away)


def generate_chat(
    loaded: LoadedBaseModel,
    messages: list[Message],
    *,
    adapter: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Generation:
    """One conversation's answer, decoded alone in this thread (``adapter`` must be attached)."""
    from tuna_llm.batching import GenerationRequest, decode_all

    request = GenerationRequest(
        text=render_chat(loaded.tokenizer, messages, add_generation_prompt=True),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        adapter=adapter,
    )
    decode_all(loaded, [request], max_batch=1)
    if request.error is not None:
        raise request.error
    return request.result


def stop_token_ids(loaded: LoadedBaseModel) -> set[int]:
    """End-of-turn and end-of-text ids: generation ends on any of them."""
    eos = loaded.base_model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()
    return ids | {loaded.tokenizer.eos_token_id}
