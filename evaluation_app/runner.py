"""The measuring part of an evaluation: generation and held-out loss on one set of loaded weights.

Django-free. Base and fine-tuned runs use the same LoadedBaseModel; the adapter is switched off for
the base run and on for the fine-tuned one, so there is one copy of the base weights in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

from inference_app.prompting import Message
from inference_app.registry import LoadedBaseModel
from training_app.lora import IGNORE_INDEX, tokenize_example


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
