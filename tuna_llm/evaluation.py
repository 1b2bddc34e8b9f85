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
from tuna_llm.prompting import Conversation, Message, answer_text, render_chat
from tuna_llm.serving.batching import GenerationRequest, decode_all
from tuna_llm.serving.engine import Generation
from tuna_llm.serving.registry import LoadedBaseModel
from tuna_llm.training import IGNORE_INDEX, PLAIN_OUTPUT_LAYER, PadCollator, answer_tokens_loss_sum, tokenize_example

EVAL_BATCH = 8  # rows decoded together, and examples per held-out loss batch


@dataclass(frozen=True)
class ExampleResult:
    index: int
    prompt: Conversation  # the conversation up to the answer, with its tools, as both models saw it
    reference: str  # the reference answer's text (answer_text of the held-out example's final message)
    reference_message: Message  # that message itself (its tool_calls, when it calls tools)
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
    examples: Sequence[Conversation | list[Message]],
    adapter: str,
    *,
    hourly_usd: float,
    hooks: EvaluationHooks = EvaluationHooks(),
    max_batch: int = EVAL_BATCH,
    mixed: bool = False,
    baseline_adapter: str | None = None,
    checks: Sequence[dict] = (),
) -> EvaluationResult:
    """Answer every example with the base model and with `adapter` (attached to `loaded`), score both.

    ``baseline_adapter``: compare with that adapter instead of the base model (its results are reported as "base").
    ``checks``: the dataset's own answer checks (``Dataset.answer_checks``), scored per example with the other
    task-aware scores (``tuna_llm.task_scores``: JSON field accuracy, labels) in both models' scores and summaries.

    An example with tools is answered with them (``render_chat`` of the Conversation's prompt slice, which keeps them);
    an answer whose reference calls tools is scored on its calls (``metrics.answer_quality``).

    Both models' rows go through one continuously batched decoding loop, as the serving engine decodes them:
    the base rows first, then the fine-tuned ones (``mixed``: side by side, each through its own adapter). Each answer's latency is its
    own share of the decoding time (``compute_ms``), which is also what it costs.
    """
    examples = [as_conversation(example) for example in examples]
    budget = decoding_budget(loaded, [answer_text(messages[-1]) for messages in examples])
    hooks.on_start(budget, len(examples))
    requests = {
        (index, name): GenerationRequest(
            text=render_chat(loaded.tokenizer, messages[:-1], add_generation_prompt=True),
            max_new_tokens=budget,
            adapter=adapter_name,
        )
        for index, messages in enumerate(examples)
        for name, adapter_name in (("base", baseline_adapter), ("finetuned", adapter))
    }
    results: list[ExampleResult | None] = [None] * len(examples)

    def on_end(request: GenerationRequest) -> None:
        """Report each example once both of its answers are in, in order (progress is "done so far")."""
        if request.error is not None:
            raise request.error
        for index in range(len(examples)):
            if results[index] is not None:
                continue
            base, tuned = requests[(index, "base")], requests[(index, "finetuned")]
            if not (base.done.is_set() and tuned.done.is_set()):
                return
            messages = examples[index]
            reference = messages[-1]
            results[index] = ExampleResult(
                index,
                messages[:-1],
                answer_text(reference),
                reference,
                base.result,
                tuned.result,
                metrics.answer_quality(base.result.text, reference, checks),
                metrics.answer_quality(tuned.result.text, reference, checks),
            )
            hooks.on_example(results[index])

    # Apart: all base rows, then all fine-tuned rows, so that most steps run one adapter for every row; mixed rows
    # (peft's per-row adapters) were slower (bench/evaluation.py, docs/performance.md).
    order = sorted(requests, key=lambda key: key if mixed else (key[1], key[0]))
    decode_all(loaded, [requests[key] for key in order], max_batch=max_batch, on_end=on_end)
    summaries = {}
    for name, adapter_name in (("base", baseline_adapter), ("finetuned", adapter)):
        answers = [(getattr(r, name), getattr(r, f"{name}_scores")) for r in results]
        run = metrics.ModelRun(
            [scores for _, scores in answers],
            [generation.compute_ms for generation, _ in answers],
            [generation.completion_tokens for generation, _ in answers],
            answer_loss(loaded, examples, adapter=adapter_name),
            answers=[generation.text for generation, _ in answers],
            references=[r.reference for r in results],
        )
        summaries[name] = metrics.summarise(run, hourly_usd=hourly_usd)
    return EvaluationResult(budget, summaries["base"], summaries["finetuned"])


def as_conversation(example: Conversation | list[Message]) -> Conversation:
    """A held-out example as a Conversation (a plain list of messages has no tools)."""
    return example if isinstance(example, Conversation) else Conversation(example)


def answer_loss(
    loaded: LoadedBaseModel,
    examples: Sequence[Conversation | list[Message]],
    *,
    adapter: str | None,
    max_seq_length: int = 1024,
    batch_size: int = EVAL_BATCH,
) -> float | None:
    """Mean cross-entropy over the reference answers' tokens (token-weighted), prompt tokens masked.

    Examples go through the model in batches of similar length (right-padded; padding is masked out of
    attention and of the loss). The loss is computed as training computes its own (``answer_tokens_loss_sum``):
    the output layer in fp32 at the answer positions, whatever the deployment's precision, so that a bf16
    deployment measures its fine-tune, not the rounding of its logits to bf16 (steps of 0.125 at the size of a
    confident logit; the answers themselves are decoded from the deployment's own logits)."""
    import torch

    rows = [row for row in (tokenize_example(loaded.tokenizer, m, max_seq_length, final_turn_only=True) for m in examples) if row]
    rows.sort(key=lambda row: len(row["input_ids"]))
    collate = PadCollator(loaded.tokenizer.pad_token_id)
    total, count = 0.0, 0
    with loaded.using(adapter) as model, torch.inference_mode():
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for start in range(0, len(rows), batch_size):
            batch = {key: value.to(loaded.device) for key, value in collate(rows[start : start + batch_size]).items()}
            if base.config.model_type in PLAIN_OUTPUT_LAYER:
                loss, tokens = answer_tokens_loss_sum(base, batch)
            else:  # logits with more than the output layer in them (soft-capping, a scale): the model's own
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :].float()
                targets = batch["labels"][:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
                )
                tokens = int((targets != IGNORE_INDEX).sum())
            total += float(loss)
            count += tokens
    return total / count if count else None


def decoding_budget(loaded: LoadedBaseModel, references: Sequence[str]) -> int:
    """The same max_new_tokens for both models: room for twice the longest reference."""
    longest = max((len(loaded.tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references), default=64)
    return max(32, min(256, 2 * longest + 16))
