"""Generation on a loaded base model, with or without an adapter. Django-free."""

from __future__ import annotations

from dataclasses import dataclass

from tuna_llm.serving.registry import LoadedBaseModel


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # from the start of its prefill to its own end
    queue_ms: float  # waiting to be admitted, before latency_ms starts
    compute_ms: float  # its share of the steps it was decoded in: what it is billed
    finish_reason: str  # "stop", "length", or "cancelled" (its client went away)


def stop_token_ids(loaded: LoadedBaseModel) -> set[int]:
    """End-of-turn and end-of-text ids: generation ends on any of them."""
    eos = loaded.base_model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()
    return ids | {loaded.tokenizer.eos_token_id}
