"""Generation on a loaded base model, with or without an adapter. Django-free."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tuna_llm.prompting import Message, render_chat
from tuna_llm.registry import LoadedBaseModel


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # from the start of its generation (its batch's start) to its own end
    queue_ms: float  # waiting for a batch, before latency_ms starts
    compute_ms: float  # its share of the generation time: what it is billed
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
    import torch

    tokenizer = loaded.tokenizer
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(loaded.device)
    prompt_len = encoded["input_ids"].shape[1]
    sampling = temperature > 0
    kwargs = {"do_sample": sampling}
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with loaded.using(adapter) as model, torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        started = time.perf_counter()
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        latency_ms = (time.perf_counter() - started) * 1000
    new_tokens = output[0, prompt_len:].tolist()
    stop_ids = stop_token_ids(loaded)
    finish = "length"
    if new_tokens and new_tokens[-1] in stop_ids:
        finish = "stop"
    return Generation(
        # A token limit can cut a multi-byte character in half: drop the partial character.
        text=tokenizer.decode(new_tokens, skip_special_tokens=True).rstrip("\ufffd").strip(),
        prompt_tokens=prompt_len,
        completion_tokens=len(new_tokens),
        latency_ms=latency_ms,
        # Run alone and at once: no queue, and all of the time is its own.
        queue_ms=0.0,
        compute_ms=latency_ms,
        finish_reason=finish,
    )


def stop_token_ids(loaded: LoadedBaseModel) -> set[int]:
    """End-of-turn and end-of-text ids: generation ends on any of them."""
    eos = loaded.base_model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()
    return ids | {loaded.tokenizer.eos_token_id}
