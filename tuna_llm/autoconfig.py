"""Settings chosen from the dataset and the base model when the user leaves them on "auto".

Django-free. Every chosen value comes with a one-line reason that the confirmation form and the job
page show. The rules come from measurements (bench/small_data.py; docs/training.md and docs/performance.md): on
small datasets the number of updates and the learning rate decide whether anything is learned.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuna_llm.training_config import KNOWN_MODULES, TrainingConfig

# A small dataset learns its output format once its examples have been seen about MIN_EXAMPLES_SEEN times in all,
# in 2-example updates (bench/small_data.py on unfamiliar 60-example tasks; docs/training.md says why).
MIN_EXAMPLES_SEEN = 240
SMALL_DATASET = 100
SMALL_DATA_BATCH = 2  # examples per update on a small dataset (in all processes together)
# Big datasets: fewer passes rather than hours of training (each pass already shows many examples).
MAX_UPDATES = 3000
DEFAULT_EPOCHS = 3
MAX_EPOCHS = 20
# Validation examples are set aside from training only when there are enough to spare.
MIN_TRAIN_FOR_VALIDATION = 20
VALIDATION_SHARE = 0.05
VALIDATION_MIN, VALIDATION_MAX = 4, 32
# Validation loss may cost at most a tenth of the training time; plan for 6% so that the first pass (which also
# warms up the kernels) and the checkpoint saved with each pass stay inside it. VALIDATION_COST: a validation
# example's cost relative to a training example (forward only vs forward + backward + update; docs/performance.md).
EVAL_BUDGET = 0.06
VALIDATION_COST = 0.42
MAX_EVALUATIONS = 10
SEQ_CAP = 2048


@dataclass(frozen=True)
class DataFacts:
    """What the choice depends on: the dataset's size and lengths, and the base model."""

    train_pool: int  # examples available for training (validation examples come out of these)
    longest_tokens: int | None = None  # longest example with the chat template
    p95_tokens: int | None = None
    parameters: int | None = None  # base model size, when its config.json is on this machine
    model_type: str | None = None
    context: int | None = None
    processes: int = 1  # processes the run trains on, in all (train_processes); the batch chosen is per process


def train_processes(setting: str | int = "auto", nodes: int = 1) -> int:
    """Processes a run trains on in all (DDP's world size): per machine ("auto": one per visible CUDA GPU, 1 without
    one, as a CPU's cores are shared by the processes rather than added) times the machines (TUNA_TRAIN_NNODES).
    "auto" counts the GPUs of the machine this runs on: the one that creates the job, not the workers that train it
    (a worker refuses a job with more processes than its GPUs: training_app.distributed.check_gpus)."""
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        import torch  # a web process without a GPU never initialises CUDA for this: device_count() does not

        per_node = torch.cuda.device_count() if torch.cuda.is_available() else 1
    else:
        per_node = int(setting)
    return max(1, per_node) * max(1, int(nodes))


def model_facts(model_dir: str | None) -> dict[str, Any]:
    """Size, architecture and context of a model from its config.json alone (no weights, no network)."""
    if not model_dir or not (Path(model_dir) / "config.json").exists():
        return {}
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return {
        "parameters": estimate_parameters(config),
        "model_type": config.get("model_type"),
        "context": config.get("max_position_embeddings"),
    }


def estimate_parameters(config: dict[str, Any]) -> int | None:
    """Parameter count of a decoder-only transformer from its config (attention, MLP, embeddings)."""
    try:
        hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads", heads)
        head_dim = config.get("head_dim") or hidden // heads
        vocab = config["vocab_size"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp) + embeddings


def _size_text(parameters: int) -> str:
    return f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.0f}M"


def validation_count(train_pool: int) -> int:
    if train_pool < MIN_TRAIN_FOR_VALIDATION:
        return 0
    return max(VALIDATION_MIN, min(VALIDATION_MAX, round(train_pool * VALIDATION_SHARE)))


def choose_settings(explicit: dict[str, Any], facts: DataFacts, *, base_model: str) -> tuple[TrainingConfig, dict[str, str]]:
    """A complete TrainingConfig: the user's values where given, chosen ones elsewhere, each with a reason."""
    # 0 for these means "choose for me", as the form says.
    explicit = {k: v for k, v in explicit.items() if not (k in ("eval_steps", "save_steps") and v == 0)}
    seed = TrainingConfig(base_model=base_model)
    values: dict[str, Any] = {"base_model": base_model}
    reasons: dict[str, str] = {}

    def pick(name: str, value: Any, reason: str) -> Any:
        if name in explicit:
            values[name] = explicit[name]
            reasons[name] = "set by you"
        else:
            values[name] = value
            reasons[name] = reason
        return values[name]

    linear = KNOWN_MODULES.get(facts.model_type or "")
    if linear:
        pick(
            "target_modules",
            tuple(linear),
            f"every linear projection of this {facts.model_type} model: learns a new format in fewer updates than q/v only",
        )
    else:
        pick(
            "target_modules",
            seed.target_modules,
            "attention query and value projections (this architecture's other layers are not known here)",
        )
    rank = pick("lora_r", 16, "rank 16: room for a new output format at a few MB of adapter")
    pick("lora_alpha", 2 * rank, "2 × rank, the usual LoRA scale")
    if facts.parameters is None:
        pick(
            "learning_rate",
            seed.learning_rate,
            "the common LoRA rate for 7-8B models (this model's size is unknown until it is downloaded)",
        )
    elif facts.parameters < 1.5e9:
        pick(
            "learning_rate",
            1e-3,
            f"{_size_text(facts.parameters)} parameters: small models need a higher rate to learn from few updates (measured)",
        )
    elif facts.parameters < 4e9:
        pick("learning_rate", 5e-4, f"{_size_text(facts.parameters)} parameters: between the small-model and the 7-8B rate")
    else:
        pick("learning_rate", seed.learning_rate, f"{_size_text(facts.parameters)} parameters: the common LoRA rate for 7B+ models")
    multiplier = explicit.get("learning_rate_multiplier")
    if multiplier is not None:
        values["learning_rate_multiplier"] = multiplier
    if multiplier is not None and "learning_rate" not in explicit:
        chosen = values["learning_rate"]
        values["learning_rate"] = chosen * multiplier
        reasons["learning_rate"] = f"{chosen:g} × {multiplier:g} (your learning_rate_multiplier): {reasons['learning_rate']}"
        reasons["learning_rate_multiplier"] = "set by you"
    validation = pick("eval_examples", validation_count(facts.train_pool), _validation_reason(facts.train_pool))
    validation = min(validation, max(0, facts.train_pool - 1))
    values["eval_examples"] = validation
    trained = facts.train_pool - validation
    processes = _processes(explicit, facts, values, reasons)
    if trained < SMALL_DATASET:
        aim, why = (
            SMALL_DATA_BATCH,
            f"{trained} examples: {SMALL_DATA_BATCH} per update gives twice the updates from the same compute (measured)",
        )
    else:
        aim, why = seed.batch_size, f"{seed.batch_size} examples per update"
    batch = pick("batch_size", *_per_process_batch(aim, why, processes))
    accumulation = pick("gradient_accumulation_steps", seed.gradient_accumulation_steps, "one batch per update")
    per_epoch = updates_per_epoch(trained, batch, processes, accumulation)
    pick("num_epochs", *_epochs(trained, per_epoch))
    max_steps = pick("max_steps", 0, "run every epoch")
    updates = max_steps or per_epoch * values["num_epochs"]
    if max_steps and max_steps < per_epoch * values["num_epochs"]:
        reasons["num_epochs"] += f"; max updates ({max_steps}) ends the run sooner"
    pick("max_seq_length", *_seq_length(facts))

    if validation:
        every = eval_every(updates, validation, batch * processes * accumulation)
        times = math.ceil(updates / every)
        pick(
            "eval_steps",
            every,
            f"validation loss {times} time{'s' if times != 1 else ''} in {updates} updates: at most a tenth of training time",
        )
        # The best checkpoint can only be kept if one is saved at each validation.
        values["save_steps"] = values["eval_steps"]
        reasons["save_steps"] = "a checkpoint at every validation, so the best one can be kept"
        if "save_steps" in explicit and explicit["save_steps"] != values["save_steps"]:
            reasons["save_steps"] += f" (your {explicit['save_steps']} applies only without validation examples)"
    else:
        pick("eval_steps", 0, "no validation examples")
        pick("save_steps", max(1, updates // 10), "about ten checkpoints per run, to resume from")
    pick(
        "lora_dropout",
        seed.lora_dropout,
        "none: the best checkpoint is kept on validation loss instead, and on CPU drawing the dropout masks took ~20% of each step",
    )
    for name in ("warmup_steps", "seed", "save_total_limit"):
        pick(name, getattr(seed, name), "default")
    if explicit.get("dpo_beta") is not None:
        values["dpo_beta"] = explicit["dpo_beta"]
    return replace(TrainingConfig(base_model=base_model), **{k: v for k, v in values.items() if k != "base_model"}), reasons


def updates_per_epoch(trained: int, batch: int, processes: int, accumulation: int) -> int:
    """Updates in one pass over `trained` examples: each process takes its share in batches of `batch` (DDP's sampler;
    the same count as tuna_llm.training.steps_per_epoch)."""
    return max(1, math.ceil(math.ceil(trained / (batch * processes)) / accumulation))


def _processes(explicit: dict[str, Any], facts: DataFacts, values: dict[str, Any], reasons: dict[str, str]) -> int:
    """The run's processes: those of the run it goes on from (a continued run passes them), else the server's."""
    if "processes" in explicit:
        values["processes"], reasons["processes"] = explicit["processes"], "the same processes as the run it goes on from"
    else:
        values["processes"] = facts.processes
        reasons["processes"] = (
            f"{facts.processes} processes on this server (TUNA_TRAIN_PROCESSES), each with its share of every update"
            if facts.processes > 1
            else "one process on this server (TUNA_TRAIN_PROCESSES)"
        )
    return values["processes"]


def _per_process_batch(aim: int, why: str, processes: int) -> tuple[int, str]:
    """The batch per process that makes `aim` examples per update on `processes` processes (at least 1 each)."""
    if processes == 1:
        return aim, why
    batch = max(1, aim // processes)
    if batch * processes == aim:
        return batch, f"{why}: {batch} on each of {processes} processes"
    if batch * processes < aim:
        return batch, f"{why}, as near as {processes} processes share evenly: {batch} on each, {batch * processes} per update"
    return batch, f"{why}, but each of the {processes} processes takes at least 1: {batch * processes} per update"


def _validation_reason(train_pool: int) -> str:
    count = validation_count(train_pool)
    if not count:
        return f"{train_pool} training examples are too few to set any aside: the last checkpoint is kept"
    return f"{count} of {train_pool} training examples set aside (not trained on, not scored by the comparison) to pick the best checkpoint"


def _epochs(trained: int, per_epoch: int) -> tuple[int, str]:
    epochs = DEFAULT_EPOCHS
    if trained * epochs < MIN_EXAMPLES_SEEN:
        epochs = min(MAX_EPOCHS, math.ceil(MIN_EXAMPLES_SEEN / max(1, trained)))
        return epochs, (
            f"{trained} examples: {epochs} epochs = {epochs * per_epoch} updates, because a small dataset needs its examples "
            f"seen about {MIN_EXAMPLES_SEEN} times in all to learn its format"
        )
    if per_epoch * epochs > MAX_UPDATES:
        epochs = max(1, MAX_UPDATES // per_epoch)
        return (
            epochs,
            f"{trained} examples: {epochs} epoch{'s' if epochs > 1 else ''} = {epochs * per_epoch} updates, enough passes for a large dataset",
        )
    return epochs, f"{trained} examples: {epochs} epochs = {epochs * per_epoch} updates"


def _seq_length(facts: DataFacts) -> tuple[int, str]:
    cap = min(SEQ_CAP, facts.context or SEQ_CAP)
    if not facts.longest_tokens:
        return TrainingConfig.max_seq_length, "default"
    if facts.longest_tokens <= cap:
        length = max(128, math.ceil(facts.longest_tokens / 64) * 64)
        return min(length, cap), f"the longest example is {facts.longest_tokens} tokens: nothing is cut"
    covered = min(cap, max(128, math.ceil((facts.p95_tokens or cap) / 64) * 64))
    return covered, f"the longest example is {facts.longest_tokens} tokens; {covered} covers 95% of them and keeps memory bounded"


def eval_every(updates: int, validation: int, examples_per_update: int) -> int:
    # Evaluations the budget allows, less the one before training and the one at the end.
    allowed = math.floor(EVAL_BUDGET * updates * examples_per_update / (VALIDATION_COST * validation)) - 2
    evaluations = max(1, min(MAX_EVALUATIONS, allowed))
    return max(1, math.ceil(updates / evaluations))
