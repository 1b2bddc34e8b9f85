"""LoRA fine-tuning with transformers' Trainer and peft. Django-free; reads top to bottom.

tokenizer -> data -> model -> trainer -> train -> save. torch/transformers/peft are imported inside
functions so that importing this module (e.g. from a task module) stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuna_llm import distributed
from tuna_llm.catalog import BaseModelSpec
from tuna_llm.loading import DevicePlan, load_tokenizer_and_model
from tuna_llm.prompting import Message, answer_text, chat_template_for, render_chat
from tuna_llm.training_config import TrainingConfig

IGNORE_INDEX = -100
CONFIG_FILENAME = "tuna_training_config.json"


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    eval_loss: float | None
    learning_rate: float | None
    tokens_seen: int
    train_seconds: float  # this run only
    eta_seconds: float | None
    eval_seconds: float = 0.0  # of train_seconds, the time spent on validation loss (this run only)


@dataclass(frozen=True)
class TrainingHooks:
    """How the training loop talks to the outside world (the database, a test, a benchmark)."""

    on_progress: Callable[[Progress], None] = lambda progress: None
    should_stop: Callable[[], bool] = lambda: False
    on_start: Callable[[int], None] = lambda total_steps: None
    # Asked when should_stop stops a run: True saves a checkpoint at the step it stops at (a pause), to resume from.
    checkpoint_on_stop: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class TrainingResult:
    stopped_early: bool
    global_step: int
    total_steps: int
    tokens_seen: int
    train_seconds: float
    adapter_dir: Path | None
    final_loss: float | None
    eval_seconds: float = 0.0
    best_step: int | None = None  # the checkpoint kept (lowest validation loss), when there was validation
    best_eval_loss: float | None = None


# -- data -------------------------------------------------------------------------------------
def tokenize_example(
    tokenizer: Any, messages: list[Message], max_seq_length: int, *, final_turn_only: bool = False
) -> dict[str, list[int]] | None:
    """Token ids with labels on the learned assistant turns only, each with its end-of-turn token.

    Every assistant turn of a conversation is learned, tool calls included as the chat template writes them,
    except a turn with ``"weight": 0``, which is context like the rest. That holds as long as the chat template
    renders each conversation prefix as a prefix of the whole; templates that rewrite earlier turns fall back to
    the last learned answer only; ``final_turn_only`` (used to score the reference answer) learns the last message. Returns None
    when no labelled token is left (every turn has weight 0, or truncation cut them all).
    """
    if final_turn_only:
        turns = [_final_segment(tokenizer, messages)]
    else:
        learned = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0 and m.get("weight", 1) != 0]
        if not learned:
            return None
        turns = _assistant_segments(tokenizer, messages, learned) or [_final_segment(tokenizer, messages[: learned[-1] + 1])]
    input_ids: list[int] = []
    labels: list[int] = []
    for context_ids, answer_ids in turns:
        input_ids += context_ids + answer_ids
        labels += [IGNORE_INDEX] * len(context_ids) + answer_ids
    input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _final_segment(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[int]]:
    prompt_text = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    full_text = render_chat(tokenizer, messages, add_generation_prompt=False)
    if full_text.startswith(prompt_text):
        return _ids(tokenizer, prompt_text), _ids(tokenizer, full_text[len(prompt_text) :])
    # A template that renders history differently once the answer is present.
    return _ids(tokenizer, prompt_text), _ids(tokenizer, answer_text(messages[-1])) + [tokenizer.eos_token_id]


def _assistant_segments(tokenizer: Any, messages: list[Message], learned: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """(context, answer) token pieces, one per learned assistant turn (a weight-0 turn stays in the next one's
    context); None if the template is not prefix-stable."""
    segments = []
    rendered = ""
    for index in learned:
        prompt_text = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        full_text = render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not prompt_text.startswith(rendered) or not full_text.startswith(prompt_text):
            return None
        segments.append((_ids(tokenizer, prompt_text[len(rendered) :]), _ids(tokenizer, full_text[len(prompt_text) :])))
        rendered = full_text
    return segments


def tokenize_examples(tokenizer: Any, examples: Sequence[list[Message]], max_seq_length: int) -> list[dict[str, list[int]]]:
    rows = (tokenize_example(tokenizer, messages, max_seq_length) for messages in examples)
    return [row for row in rows if row is not None]


class PadCollator:
    """Pads a batch to its longest example; padding is masked out of attention and loss."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


# -- config -> peft / transformers objects ----------------------------------------------------
def lora_config(config: TrainingConfig):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
    )


def steps_per_epoch(config: TrainingConfig, train_rows: int) -> int:
    """Updates per epoch: each of the processes takes its share of the rows (DDP's sampler), in batches."""
    batches = math.ceil(train_rows / (config.batch_size * config.processes))
    return max(1, math.ceil(batches / config.gradient_accumulation_steps))


def total_steps(config: TrainingConfig, train_rows: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return steps_per_epoch(config, train_rows) * config.num_epochs


def training_arguments(config: TrainingConfig, *, output_dir: Path, plan: DevicePlan, train_rows: int, has_eval: bool):
    from transformers import TrainingArguments

    return TrainingArguments(**trainer_settings(config, output_dir=output_dir, plan=plan, train_rows=train_rows, has_eval=has_eval))


def trainer_settings(config: TrainingConfig, *, output_dir: Path, plan: DevicePlan, train_rows: int, has_eval: bool) -> dict[str, Any]:
    """The Trainer's arguments for a run (shared by supervised and preference tuning)."""
    steps = total_steps(config, train_rows)
    every = max(1, steps // 10)
    eval_steps = config.eval_steps or every
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="linear",
        logging_steps=max(1, steps // 200),
        logging_first_step=True,
        save_strategy="steps",
        # With validation, a checkpoint at every validation so that the best one can be kept.
        save_steps=eval_steps if has_eval else (config.save_steps or every),
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        # The Trainer tracks the lowest validation loss and never rotates that checkpoint away; which
        # checkpoint is kept is decided after training (checkpoint_to_keep).
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        seed=config.seed,
        data_seed=config.seed,
        bf16=plan.dtype_name == "bfloat16",
        use_cpu=plan.device == "cpu",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=plan.device == "cuda",
        include_num_input_tokens_seen="non_padding",
        # Several processes (torchrun, tuna_llm.distributed): DDP on gloo on CPU (NCCL on CUDA, the default); every
        # LoRA weight takes part in every step, so DDP need not look for unused ones.
        **(
            {"ddp_backend": "gloo" if plan.device == "cpu" else None, "ddp_find_unused_parameters": False}
            if distributed.world_size() > 1
            else {}
        ),
    )


def make_progress_callback(hooks: TrainingHooks, *, has_eval: bool):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Writes progress on each log, stops training when asked (checked every step; a pause saves a checkpoint
        at the step it stops at), and validates and saves at the last step so the final weights compete for
        "best checkpoint" too."""

        started: float | None = None
        start_step = 0
        eval_seconds = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.start_step = state.global_step
            hooks.on_start(state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs and "eval_loss" not in logs:
                return
            self.eval_seconds += float(logs.get("eval_runtime", 0.0))
            elapsed = time.perf_counter() - self.started if self.started is not None else 0.0
            done = state.global_step - self.start_step
            remaining = state.max_steps - state.global_step
            eta = elapsed / done * remaining if done > 0 else None
            hooks.on_progress(
                Progress(
                    step=state.global_step,
                    total_steps=state.max_steps,
                    epoch=float(state.epoch or 0),
                    loss=logs.get("loss"),
                    eval_loss=logs.get("eval_loss"),
                    learning_rate=logs.get("learning_rate"),
                    tokens_seen=int(state.num_input_tokens_seen or 0),
                    train_seconds=elapsed,
                    eta_seconds=eta,
                    eval_seconds=self.eval_seconds,
                )
            )

        def on_save(self, args, state, control, **kwargs):
            # On several processes rank 0 writes the checkpoint's weights, optimizer and state, and every rank its own
            # rng_state_<rank>.pth: all ranks save at the same steps, so each meets the others here before rank 0 marks
            # the checkpoint whole.
            distributed.all_ranks_here()
            if state.is_world_process_zero:
                mark_checkpoint_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_step_end(self, args, state, control, **kwargs):
            if hooks.should_stop():
                control.should_training_stop = True
                control.should_save = hooks.checkpoint_on_stop()
                control.should_evaluate = False
            elif has_eval and state.global_step >= state.max_steps:
                control.should_evaluate = True
                control.should_save = True

    return ProgressCallback()


# Architectures whose logits are the output layer applied to the last hidden state, nothing more (no
# soft-capping, no logit scale): their loss can be computed at the answer tokens alone.
PLAIN_OUTPUT_LAYER = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def make_trainer(**kwargs):
    """transformers' Trainer, computing the output layer only where the loss is taken (see AnswerTokensTrainer)."""
    from transformers import Trainer

    class AnswerTokensTrainer(Trainer):
        """The same loss as the model's own, computed on the answer tokens alone.

        The model's forward projects every position onto the vocabulary (49,152 columns for SmolLM2, 128,256 for
        Llama 3.1) and then throws away the prompt positions, whose labels are masked. Here the decoder runs as
        usual and the output layer and cross-entropy run only at the positions that have a label: the same
        value (tested), without the prompt's share of the largest matrix product and of the softmax.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            unwrapped = self.accelerator.unwrap_model(model)
            base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            if return_outputs or "labels" not in inputs or base.config.model_type not in PLAIN_OUTPUT_LAYER:
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            hidden = None
            if unwrapped is not model:
                # Wrapped by DDP (several processes): the decoder must run inside the wrapper's forward, or DDP does not
                # all-reduce the gradients. The wrapped model's forward becomes the decoder's for this call (the same
                # computation as one process runs, without the autocast accelerate wraps the model's forward in).
                decoder = base.get_decoder()

                def decode(input_ids, attention_mask=None):
                    return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

                with _forward_replaced(unwrapped, decode):
                    hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            loss = answer_tokens_loss(base, inputs, num_items_in_batch, hidden=hidden)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.accelerator.num_processes > 1:
                # As the Trainer's own compute_loss: num_items_in_batch counts every process's tokens and DDP averages
                # the gradients over the processes, so each process's share of the sum is scaled back by their number.
                loss = loss * self.accelerator.num_processes
            return loss

    return AnswerTokensTrainer(**kwargs)


@contextmanager
def _forward_replaced(module: Any, forward: Callable[..., Any]) -> Iterator[None]:
    """`module`'s forward is `forward` inside the block (an instance attribute, put back as it was after)."""
    missing = object()
    saved = module.__dict__.get("forward", missing)
    module.forward = forward
    try:
        yield
    finally:
        if saved is missing:
            del module.forward
        else:
            module.forward = saved


def answer_tokens_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None, *, hidden: Any = None) -> Any:
    """Cross-entropy of the next-token predictions at the labelled positions, as the model's own loss computes it
    (a sum over ``num_items_in_batch`` when given, else the mean), with the output layer applied there alone.

    In bf16 the output layer runs in fp32 (``fp32_logits``): the logits a bf16 product returns are rounded to
    bf16 (steps of 0.125 at the size of a confident logit), and a fine-tune that drives its answers' loss towards
    zero then learns against rounding noise (docs/training.md; the small-data figures are in docs/performance.md)."""
    import torch

    total, count = answer_tokens_loss_sum(model, inputs, hidden=hidden)
    if num_items_in_batch is None:
        return total / count
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def answer_tokens_loss_sum(model: Any, inputs: dict[str, Any], *, hidden: Any = None) -> tuple[Any, int]:
    """(summed cross-entropy, token count) at the labelled positions: the decoder (or its last hidden state given as
    `hidden`), then the output layer in fp32 at those positions alone. For a model whose architecture is in
    PLAIN_OUTPUT_LAYER."""
    import torch

    if hidden is None:
        hidden = model.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).last_hidden_state
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = fp32_logits(model.get_output_embeddings(), hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


VOCABULARY_SLICE = 16384  # output rows cast to fp32 at a time in inference (268 MB for an 8B's 4,096 columns)


def fp32_logits(head: Any, hidden: Any) -> Any:
    """The output layer's logits in fp32: for a plain linear output layer on bf16 (or fp16) states, the product
    computed in fp32 from the same values (no rounding of the logits to bf16); otherwise the layer's own output,
    made fp32. A frozen output layer's fp32 weight is made once per training run and kept (_frozen_fp32_weight)."""
    import torch

    # A linear layer (the serving model's ServingLinear too) with 16-bit float weights; not a quantized one.
    plain = isinstance(head, torch.nn.Linear) and head.weight.dtype in (torch.bfloat16, torch.float16)
    if hidden.dtype == torch.float32 or not plain:
        return head(hidden).float()
    bias = None if head.bias is None else head.bias.float()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if torch.is_inference_mode_enabled() and not head.weight.requires_grad:
            # A serving model: slices of the vocabulary cast in turn, never a whole fp32 copy of its largest
            # matrix (2 GB for Llama 3.1 8B's output layer), neither kept nor made per call.
            rows, states = VOCABULARY_SLICE, hidden.float()
            return torch.cat(
                [
                    torch.nn.functional.linear(states, head.weight[i : i + rows].float(), None if bias is None else bias[i : i + rows])
                    for i in range(0, head.weight.shape[0], rows)
                ],
                dim=-1,
            )
        weight = head.weight.float() if head.weight.requires_grad else _frozen_fp32_weight(head)
        return torch.nn.functional.linear(hidden.float(), weight, bias)


def _frozen_fp32_weight(head: Any) -> Any:
    """An fp32 copy of a frozen layer's weight, kept on the layer (cast once per run, not on every step); made
    again if the weight was replaced. Reads the tensor's private ``_version`` counter (torch bumps it on every
    in-place write) to notice a replaced weight; tuna_llm/tests/test_engine_contracts.py pins it."""
    key = (head.weight.data_ptr(), head.weight._version)
    cached = head.__dict__.get("_tuna_fp32_weight")
    if cached is None or cached[0] != key:
        cached = head.__dict__["_tuna_fp32_weight"] = (key, head.weight.detach().float())
    return cached[1]


# -- bf16 training on CPU -----------------------------------------------------------------------
FP32_ATTENTION = "tuna_fp32_attention"


def load_for_training(spec: BaseModelSpec, plan: DevicePlan, *, hf_token: str | None = None) -> tuple[Any, Any]:
    """The tokenizer and a fresh copy of the base model, as training runs it: in bf16 on a CPU, a model that
    transformers runs with PyTorch's SDPA gets the same attention computed in fp32 (``fp32_attention``); one
    that needs another (soft-capped or sink attention: Gemma 2, GPT-OSS) keeps its own."""
    tokenizer, model = load_tokenizer_and_model(spec, plan, hf_token=hf_token)
    if plan.device == "cpu" and plan.dtype_name == "bfloat16" and model.config._attn_implementation == "sdpa":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(FP32_ATTENTION, fp32_attention)
        AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)
        model.set_attn_implementation(FP32_ATTENTION)
    return tokenizer, model


def fp32_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """PyTorch's scaled-dot-product attention on bf16 states, computed in fp32 (autocast off), the output in bf16.

    For speed: on CPU, PyTorch's bf16 attention kernel is fast forwards and slow backwards (docs/performance.md).
    Attention has no weights: only the states are cast; quality is unchanged on the small-data bench."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.float()
    with torch.autocast(device_type=query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module,
            query.float(),
            key.float(),
            value.float(),
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    return out.to(query.dtype), weights


# -- the run ----------------------------------------------------------------------------------
def run_lora_training(
    config: TrainingConfig,
    *,
    spec: BaseModelSpec,
    plan: DevicePlan,
    train_examples: Sequence[list[Message]],
    eval_examples: Sequence[list[Message]] = (),
    output_dir: Path,
    hooks: TrainingHooks = TrainingHooks(),
    resume_from: Path | None = None,
    init_adapter: Path | None = None,
    extra_callbacks: Sequence[Any] = (),
    hf_token: str | None = None,
) -> TrainingResult:
    """Train a LoRA adapter; with `eval_examples` (validation), keep the checkpoint of lowest validation loss.

    `init_adapter` continues training an existing adapter (a "continue training" run) instead of a fresh one.

    Under torchrun (several processes, tuna_llm.distributed) every rank calls this with the same arguments: each
    trains on its share of the rows (DDP), rank 0 alone reports progress, marks checkpoints and saves the adapter,
    and all of them stop at the step rank 0 decides (``hooks`` as ``distributed.rank_hooks`` makes them).
    """
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    set_seed(config.seed)
    # A fresh copy of the base weights: peft injects LoRA layers into the model it is given.
    tokenizer, model = load_for_training(spec, plan, hf_token=hf_token)

    train_rows = tokenize_examples(tokenizer, train_examples, config.max_seq_length)
    eval_rows = tokenize_examples(tokenizer, list(eval_examples)[: config.eval_examples], config.max_seq_length)
    if not train_rows:
        raise ValueError("No training example has answer tokens left after cutting to max_seq_length; raise max_seq_length.")

    model.config.use_cache = False
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(config))
    model.train()

    checkpoints = output_dir / "checkpoints"
    main = distributed.is_main_process()
    if resume_from is not None and main:
        discard_incomplete_checkpoints(output_dir)
    hooks = distributed.rank_hooks(hooks)
    progress = make_progress_callback(hooks, has_eval=bool(eval_rows))
    trainer = make_trainer(
        model=model,
        args=training_arguments(config, output_dir=checkpoints, plan=plan, train_rows=len(train_rows), has_eval=bool(eval_rows)),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=[progress, *extra_callbacks],
    )
    started = time.perf_counter()
    if eval_rows and resume_from is None and init_adapter is None:
        trainer.evaluate()  # the validation loss before any update: where "did it learn?" starts from
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:
        if main:
            discard_incomplete_checkpoints(output_dir)  # a save cut short (a full disk, a kill) leaves nothing half-written
        raise
    train_seconds = time.perf_counter() - started
    state = trainer.state
    stopped_early = hooks.should_stop()
    evals = [(int(log["step"]), float(log["eval_loss"])) for log in state.log_history if "eval_loss" in log]
    kept = checkpoint_to_keep(evals) if eval_rows and not stopped_early else None
    if kept is not None and kept[0] != state.global_step and main:
        load_checkpoint_weights(model, checkpoints / f"checkpoint-{kept[0]}")
    adapter_dir = None
    if not stopped_early and main:
        adapter_dir = output_dir / "adapter"
        try:
            save_adapter(model, tokenizer, config, spec, adapter_dir)
        except BaseException:
            shutil.rmtree(adapter_dir, ignore_errors=True)  # no half-written adapter is ever served
            raise
    return TrainingResult(
        stopped_early=stopped_early,
        global_step=state.global_step,
        total_steps=state.max_steps,
        tokens_seen=int(state.num_input_tokens_seen or 0),
        train_seconds=train_seconds,
        adapter_dir=adapter_dir,
        final_loss=output.training_loss if output else None,
        eval_seconds=progress.eval_seconds,
        best_step=kept[0] if kept else None,
        best_eval_loss=kept[1] if kept else None,
    )


# A rise in validation loss smaller than this share of the loss before training is noise (a handful of
# validation examples): the later, more trained weights are kept. A larger rise is over-fitting.
NOISE_SHARE = 0.02


def checkpoint_to_keep(evals: Sequence[tuple[int, float]]) -> tuple[int, float] | None:
    """(step, validation loss) of the checkpoint to keep, from the validations of a run (step 0 = before training).

    The last checkpoint, unless the validation loss rose clearly above its lowest point after it: then the
    checkpoint where it was lowest (the weights before over-fitting).
    """
    trained = [point for point in evals if point[0] > 0]
    if not trained:
        return None
    scale = evals[0][1] if evals[0][0] == 0 else max(loss for _, loss in trained)
    best = min(trained, key=lambda point: point[1])
    last = trained[-1]
    return last if last[1] - best[1] <= NOISE_SHARE * scale else best


def load_checkpoint_weights(model: Any, checkpoint: Path) -> None:
    """Put a saved checkpoint's LoRA weights back into the model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))


def save_adapter(model: Any, tokenizer: Any, config: TrainingConfig, spec: BaseModelSpec, adapter_dir: Path) -> None:
    """Standard PEFT layout (loads with PeftModel.from_pretrained) plus the resolved settings; the tokenizer carries
    the chat template the fine-tune was trained with (chat_template_for: tools-capable where the base has one)."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(adapter_dir))
    save_tokenizer(tokenizer, adapter_dir)
    resolved = {**config.to_dict(), "base_model_source": spec.load_path}
    (adapter_dir / CONFIG_FILENAME).write_text(json.dumps(resolved, indent=2), encoding="utf-8")


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """The tokenizer with ``chat_template_for`` its chat template (the tokenizer object itself is left as it was)."""
    own = getattr(tokenizer, "chat_template", None)
    template = chat_template_for(tokenizer) if own else None
    try:
        if template:
            tokenizer.chat_template = template
        tokenizer.save_pretrained(str(folder))
    finally:
        if template:
            tokenizer.chat_template = own


# Written into a checkpoint once the Trainer has saved all of it: a checkpoint cut short (a kill, a full
# disk) has no marker, is never resumed from, and is removed before a resume.
COMPLETE_MARKER = "tuna-checkpoint-complete"


def mark_checkpoint_complete(checkpoint: Path) -> None:
    partial = checkpoint / f".{COMPLETE_MARKER}.partial"
    partial.write_text("complete\n", encoding="utf-8")
    os.replace(partial, checkpoint / COMPLETE_MARKER)


def _checkpoints(output_dir: Path) -> list[Path]:
    found = (p for p in (output_dir / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit())
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint that was saved whole."""
    complete = [p for p in _checkpoints(output_dir) if (p / COMPLETE_MARKER).is_file()]
    return complete[-1] if complete else None


def discard_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Remove the checkpoints that were never saved whole (before a resume writes over their steps)."""
    incomplete = [p for p in _checkpoints(output_dir) if not (p / COMPLETE_MARKER).is_file()]
    for checkpoint in incomplete:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return incomplete
