"""The evaluation workflow: base vs fine-tuned on held-out examples, on one set of loaded weights.

Django-free; reads top to bottom like ``run_lora_training``: decoding budget -> per example, both answers
and their scores -> held-out loss of each model -> summaries. Base and fine-tuned runs use the same
LoadedBaseModel; the adapter is switched off for the base run and on for the fine-tuned one, so there is
one copy of the base weights in memory. What happens to the results (rows, progress) is up to the hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tuna_llm import metrics
from tuna_llm.engine import Generation, generate_chat
from tuna_llm.prompting import Message
from tuna_llm.registry import LoadedBaseModel
from tuna_llm.training import IGNORE_INDEX, tokenize_example


@dataclass(frozen=True)
class ExampleResult:
    index: int
    prompt: list[Message]  # the conversation up to the answer, as both models saw it
    reference: str
    base: Generation
    finetuned: Generation
    base_scores: dict[str, float]
    finetuned_scores: dict[str, float]


@dataclass(frozen=True)
class EvaluationHooks:
    on_start: Callable[[int, int], None] = lambda budget, count: None  # decoding budget, examples
    on_example: Callable[[ExampleResult], None] = lambda result: None


@dataclass(frozen=True)
class EvaluationResult:
    budget: int
    base: dict[str, Any]  # metrics.summarise of each model
    finetuned: dict[str, Any]

    def as_dict(self, hourly_usd: float) -> dict[str, Any]:
        return {
            "base_model": self.base,
            "finetuned_model": self.finetuned,
            "improvements": metrics.improvements(self.base, self.finetuned),
            "decoding": {"greedy": True, "max_new_tokens": self.budget},
            "hourly_usd": hourly_usd,
        }


def run_evaluation(
    loaded: LoadedBaseModel,
    examples: Sequence[list[Message]],
    adapter: str,
    *,
    hourly_usd: float,
    hooks: EvaluationHooks = EvaluationHooks(),
) -> EvaluationResult:
    """Answer every example with the base model and with `adapter` (attached to `loaded`), score both."""
    budget = decoding_budget(loaded, [messages[-1]["content"] for messages in examples])
    hooks.on_start(budget, len(examples))
    answers: dict[str, list[tuple[Generation, dict[str, float]]]] = {"base": [], "finetuned": []}
    for index, messages in enumerate(examples):
        prompt, reference = messages[:-1], messages[-1]["content"]
        # Same rendering, same greedy decoding, same weights: only the adapter switch differs.
        base = generate_chat(loaded, prompt, adapter=None, max_new_tokens=budget)
        tuned = generate_chat(loaded, prompt, adapter=adapter, max_new_tokens=budget)
        result = ExampleResult(
            index, prompt, reference, base, tuned, metrics.quality(base.text, reference), metrics.quality(tuned.text, reference)
        )
        answers["base"].append((base, result.base_scores))
        answers["finetuned"].append((tuned, result.finetuned_scores))
        hooks.on_example(result)
    summaries = {}
    for name, adapter_name in (("base", None), ("finetuned", adapter)):
        run = metrics.ModelRun(
            [scores for _, scores in answers[name]],
            [generation.latency_ms for generation, _ in answers[name]],
            [generation.completion_tokens for generation, _ in answers[name]],
            answer_loss(loaded, examples, adapter=adapter_name),
        )
        summaries[name] = metrics.summarise(run, hourly_usd=hourly_usd)
    return EvaluationResult(budget, summaries["base"], summaries["finetuned"])


def answer_loss(
    loaded: LoadedBaseModel, examples: Sequence[list[Message]], *, adapter: str | None, max_seq_length: int = 1024
) -> float | None:
    """Mean cross-entropy over the reference answers' tokens (token-weighted), prompt tokens masked."""
    import torch

    total, count = 0.0, 0
    with loaded.using(adapter) as model, torch.inference_mode():
        for messages in examples:
            row = tokenize_example(loaded.tokenizer, messages, max_seq_length, final_turn_only=True)
            if row is None:
                continue
            input_ids = torch.tensor([row["input_ids"]], device=loaded.device)
            labels = torch.tensor([row["labels"]], device=loaded.device)
            logits = model(input_ids=input_ids).logits[:, :-1, :].float()
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += float(loss)
            count += int((targets != IGNORE_INDEX).sum())
    return total / count if count else None


def decoding_budget(loaded: LoadedBaseModel, references: Sequence[str]) -> int:
    """The same max_new_tokens for both models: room for twice the longest reference."""
    longest = max((len(loaded.tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references), default=64)
    return max(32, min(256, 2 * longest + 16))
