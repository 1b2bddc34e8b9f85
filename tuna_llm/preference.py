"""Preference tuning: DPO (TRL) of a fine-tuned LoRA adapter on chosen / rejected answer pairs. Django-free.

The pairs come from blind votes (and, when the user opts in, a judge's verdicts) on an evaluation: the answer
preferred is "chosen", the other "rejected". Training starts from the fine-tune's adapter and keeps a frozen
copy of it as DPO's reference model (TRL adds it as a second adapter, "ref", on the same base weights), so
the new adapter moves towards the chosen answers and away from the rejected ones relative to the model the
votes were cast on, not relative to the base model. The chosen answers' own next-token loss is added to DPO's,
so that their likelihood does not fall with the rejected ones' (see DPO_LOSS). It runs with the same Trainer arguments, progress
callback, checkpoints and resume as supervised training (tuna_llm.training).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuna_llm.catalog import BaseModelSpec
from tuna_llm.loading import DevicePlan
from tuna_llm.prompting import Message, chat_template_for
from tuna_llm.training import (
    TrainingHooks,
    TrainingResult,
    discard_incomplete_checkpoints,
    load_for_training,
    lora_config,
    make_progress_callback,
    save_adapter,
    trainer_settings,
)
from tuna_llm.training_config import TrainingConfig

# DPO's beta: how far the tuned model may move from the reference (higher = closer). TRL's default and the
# DPO paper's usual value.
DPO_BETA = 0.1
# DPO's loss plus the plain next-token loss on the chosen answers (TRL's "sft" term, as in RPO). Pure DPO can
# lower the chosen answers' likelihood along with the rejected ones' and the greedy answers drift into neither
# (bench/preference_loop.py; docs/evaluation.md).
DPO_LOSS = ("sigmoid", "sft")
DPO_LOSS_WEIGHTS = (1.0, 1.0)
# The learning rate of LoRA preference tuning on a few pairs: a higher one memorises a handful of pairs within a
# few updates (bench/preference_loop.py).
DPO_LEARNING_RATE = 5e-5
# Enough updates to move the answers on a small vote set, few enough to keep a CPU run to minutes.
DPO_TARGET_UPDATES = 30
DPO_MAX_EPOCHS = 10


@dataclass(frozen=True)
class PreferencePair:
    messages: list[Message]  # the conversation up to the answer, as the models saw it
    chosen: str | Message  # an answer's text (a vote), or an assistant message (a preference file: it may call tools)
    rejected: str | Message
    tools: list[dict] | None = None  # the tools the conversation offers (a preference file's input.tools)


def preference_settings(
    start: TrainingConfig, pairs: int, *, epochs: int | None = None, explicit: Mapping[str, Any] | None = None
) -> tuple[TrainingConfig, dict[str, str]]:
    """The settings of a preference-tuning run that starts from a model trained (or chosen) with `start`'s settings,
    and why each has its value. `explicit`: settings the user set (num_epochs, batch_size, learning_rate or
    learning_rate_multiplier, dpo_beta, seed, max_steps, ...), which win over the chosen ones."""
    explicit = {k: v for k, v in (explicit or {}).items() if k != "base_model"}
    if epochs is not None:
        explicit["num_epochs"] = epochs
    # Preference tuning trains on one process (training_app.distributed runs supervised jobs only on several): as many
    # pairs per update as the start's examples per update on all its processes, at most 4.
    batch = explicit.get("batch_size") or max(1, min(start.batch_size * start.processes, 4, pairs))
    per_epoch = math.ceil(pairs / batch)
    chosen_epochs = explicit.get("num_epochs") or max(1, min(DPO_MAX_EPOCHS, math.ceil(DPO_TARGET_UPDATES / per_epoch)))
    multiplier = explicit.get("learning_rate_multiplier")
    rate = explicit.get("learning_rate") or DPO_LEARNING_RATE * (multiplier or 1.0)
    beta = explicit.get("dpo_beta") or DPO_BETA
    values = {
        **start.to_dict(),
        "num_epochs": chosen_epochs,
        "batch_size": batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": rate,
        "learning_rate_multiplier": multiplier or 1.0,
        "warmup_steps": 0,
        "max_steps": 0,
        "eval_examples": 0,
        "eval_steps": 0,
        "save_steps": 0,
        "dpo_beta": beta,
        "processes": 1,
        **{k: v for k, v in explicit.items() if k not in ("eval_examples", "eval_steps")},
    }
    config = TrainingConfig.from_dict(values)
    reasons = {
        "num_epochs": f"{chosen_epochs} epoch{'s' if chosen_epochs != 1 else ''} of {pairs} pairs: about {DPO_TARGET_UPDATES} updates",
        "batch_size": f"{batch} pair{'s' if batch != 1 else ''} per update (each pair is two sequences)",
        "processes": "one process: preference tuning does not train on several",
        "learning_rate": f"{DPO_LEARNING_RATE:g}, the preference-tuning rate for a LoRA adapter (plus the chosen answers' own loss)",
        "dpo_beta": f"{DPO_BETA}, the usual DPO beta",
        "eval_examples": "no validation: every pair is a preference to learn from; the evaluation against the starting model is the test",
    }
    for name in explicit:
        reasons[name] = "set by you"
    if multiplier and "learning_rate" not in explicit:
        reasons["learning_rate"] = (
            f"{DPO_LEARNING_RATE:g} × {multiplier:g} (your learning_rate_multiplier): the preference-tuning rate for a LoRA adapter"
        )
    return config, reasons


def _answer(answer: str | Message) -> Message:
    if isinstance(answer, str):
        return {"role": "assistant", "content": answer}
    return {k: v for k, v in answer.items() if k != "weight"}


def preference_rows(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    """TRL's conversational preference format: the prompt as messages, each answer as one assistant message, and
    the tools (JSON, which TRL reads) where the conversation offers any."""
    rows = [
        {
            "prompt": [{k: v for k, v in message.items() if k != "weight"} for message in pair.messages],
            "chosen": [_answer(pair.chosen)],
            "rejected": [_answer(pair.rejected)],
        }
        for pair in pairs
    ]
    if any(pair.tools for pair in pairs):
        for row, pair in zip(rows, pairs, strict=True):
            row["tools"] = json.dumps(pair.tools) if pair.tools else None
    return rows


@contextmanager
def answer_positions_only() -> Iterator[None]:
    """Have TRL's fused LM head score only the answer positions (the tokens with a label) on every device.

    TRL (1.16) computes DPO's per-token log-probabilities through a fused LM head that keeps only the labelled
    positions where Triton runs (CUDA, XPU) and scores every position elsewhere: on a CPU the output layer
    (49,152 x 576 for SmolLM2, forward and backward) then runs over the prompts and the padding too, whose
    results are masked away. Scoring only the labelled positions gives the same log-probabilities (the same
    loss to the last digit, tested) and makes a CPU DPO step cheaper (docs/performance.md). The choice is the module-level
    ``_use_triton`` that TRL's fused head reads on each call; only that binding is changed (TRL's kernels keep
    their own, so the computation stays on torch's CPU tiles), and only while a DPO run trains.
    """
    from trl.trainer import utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def run_preference_training(
    config: TrainingConfig,
    *,
    spec: BaseModelSpec,
    plan: DevicePlan,
    pairs: Sequence[PreferencePair],
    init_adapter: Path | None,
    output_dir: Path,
    hooks: TrainingHooks = TrainingHooks(),
    resume_from: Path | None = None,
    beta: float | None = None,
    extra_callbacks: Sequence[Any] = (),
    hf_token: str | None = None,
) -> TrainingResult:
    """DPO on `pairs`, starting from (and referenced to) the adapter in `init_adapter`, or without one from a fresh
    adapter on the base model (referenced to the base weights); saves the new adapter. `beta`: the config's
    dpo_beta unless given, DPO_BETA when neither is."""
    import time

    from datasets import Dataset
    from peft import PeftModel
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError("There are no preference pairs to train on.")
    set_seed(config.seed)
    tokenizer, model = load_for_training(spec, plan, hf_token=hf_token)
    model.config.use_cache = False
    peft_config = None
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:  # TRL wraps it; the reference is the base model, the adapter disabled
        peft_config = lora_config(config)
    # The template supervised training renders with and saves with the adapter: tools render the same way here.
    tokenizer.chat_template = chat_template_for(tokenizer) or tokenizer.chat_template

    checkpoints = output_dir / "checkpoints"
    if resume_from is not None:
        discard_incomplete_checkpoints(output_dir)
    progress = make_progress_callback(hooks, has_eval=False)
    arguments = trainer_settings(config, output_dir=checkpoints, plan=plan, train_rows=len(pairs), has_eval=False)
    args = DPOConfig(
        **arguments,
        beta=beta if beta is not None else config.dpo_beta if config.dpo_beta is not None else DPO_BETA,
        max_length=config.max_seq_length,
        loss_type=list(DPO_LOSS),
        loss_weights=list(DPO_LOSS_WEIGHTS),
        # TRL turns it on by default; supervised training runs without it (transformers' default), and so does this.
        gradient_checkpointing=False,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(preference_rows(pairs)),
        processing_class=tokenizer,
        callbacks=[progress, *extra_callbacks],
        peft_config=peft_config,
    )
    started = time.perf_counter()
    with answer_positions_only():
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - started
    state = trainer.state
    stopped_early = hooks.should_stop()
    adapter_dir = None
    if not stopped_early:
        model = trainer.model
        if "ref" in model.peft_config:  # the frozen reference copy is not part of the result
            model.delete_adapter("ref")
        adapter_dir = output_dir / "adapter"
        save_adapter(model, tokenizer, config, spec, adapter_dir)
    return TrainingResult(
        stopped_early=stopped_early,
        global_step=state.global_step,
        total_steps=state.max_steps,
        tokens_seen=int(state.num_input_tokens_seen or 0),
        train_seconds=train_seconds,
        adapter_dir=adapter_dir,
        final_loss=output.training_loss if output else None,
    )
