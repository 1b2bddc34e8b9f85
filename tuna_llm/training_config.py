"""Training settings: defaults, ranges and one validation used by the page, the API and the admin."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Projection names peft can target, per transformers architecture (config.json "model_type").
LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KNOWN_MODULES = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


@dataclass(frozen=True)
class TrainingConfig:
    base_model: str
    num_epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 2e-4
    max_seq_length: int = 512
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    seed: int = 42
    # 0 = train for num_epochs; a positive number stops after that many optimizer steps.
    max_steps: int = 0
    # 0 = automatic: about ten checkpoints / validation-loss evaluations over the run.
    save_steps: int = 0
    eval_steps: int = 0
    save_total_limit: int = 3
    # Validation examples, set aside from the training examples (never trained on, never scored by the
    # comparison): their loss picks the checkpoint that is kept. 0 = none.
    eval_examples: int = 16
    # A record of the caller's scale on the chosen learning rate (learning_rate is already the scaled rate).
    learning_rate_multiplier: float = 1.0
    # DPO's beta for a preference-tuning run; None: tuna_llm.preference.DPO_BETA.
    dpo_beta: float | None = None
    # Processes the run trains on (DDP through torchrun; the deployment's TUNA_TRAIN_PROCESSES when the job was
    # created, kept so that a resumed run goes on with the same ones). batch_size is per process.
    processes: int = 1

    @property
    def effective_batch(self) -> int:
        """Examples per update: per-process batch x processes x gradient accumulation."""
        return self.batch_size * self.processes * self.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


@dataclass(frozen=True)
class Field:
    kind: type
    minimum: float
    maximum: float
    label: str
    help: str
    advanced: bool = True


RANGES: dict[str, Field] = {
    "num_epochs": Field(int, 1, 50, "Epochs", "Passes over the training examples.", advanced=False),
    "learning_rate": Field(float, 1e-7, 1e-2, "Learning rate", "Step size of each update.", advanced=False),
    "batch_size": Field(
        int,
        1,
        128,
        "Batch size per process",
        "Examples each training process takes per step; an update learns from batch size × processes × accumulation.",
        advanced=False,
    ),
    "max_seq_length": Field(int, 32, 32768, "Max tokens per example", "Longer examples are cut to this many tokens.", advanced=False),
    "lora_r": Field(int, 1, 256, "LoRA rank (r)", "Capacity of the adapter."),
    "lora_alpha": Field(int, 1, 1024, "LoRA alpha", "Scale of the LoRA update (often 2 × r)."),
    "lora_dropout": Field(float, 0.0, 0.5, "LoRA dropout", "Dropout on the LoRA path."),
    "warmup_steps": Field(int, 0, 100000, "Warm-up updates", "Updates over which the learning rate ramps up."),
    "gradient_accumulation_steps": Field(int, 1, 128, "Gradient accumulation", "Batches whose gradients add up before one update."),
    "seed": Field(int, 0, 2**31 - 1, "Random seed", "The same seed and data give the same run."),
    "max_steps": Field(int, 0, 1000000, "Max updates", "Stop after this many updates (0 = run all epochs)."),
    "save_steps": Field(int, 0, 1000000, "Checkpoint every", "Updates between checkpoints (0 = automatic)."),
    "eval_steps": Field(int, 0, 1000000, "Validate every", "Updates between validation-loss measurements (0 = automatic)."),
    "save_total_limit": Field(int, 1, 20, "Checkpoints kept", "Checkpoints kept on disk besides the best one."),
    "eval_examples": Field(
        int, 0, 256, "Validation examples", "Set aside from training to pick the best checkpoint; never trained on (0 = none)."
    ),
}


# Settings that are positive numbers up to a bound (0 itself is refused): (bound, what the setting does).
POSITIVE: dict[str, tuple[float, str]] = {
    "learning_rate_multiplier": (10.0, "Scales the learning rate chosen for this data and model."),
    "dpo_beta": (5.0, "How far preference tuning may move from the reference model (higher = closer)."),
}


# Values a job's settings show that the server decides, not the user: what an attempt to set one is told.
SERVER_CHOSEN: dict[str, str] = {
    "processes": "Chosen by the server (TUNA_TRAIN_PROCESSES), not per job; leave it out. batch_size is per process.",
    "effective_batch": (
        "Follows from the other settings (batch_size per process × processes × gradient_accumulation_steps); leave it out "
        "and set batch_size or gradient_accumulation_steps instead."
    ),
}


@dataclass
class ConfigResult:
    """The settings the user gave, checked (base_model always set); the rest is chosen later."""

    explicit: dict[str, Any] | None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> TrainingConfig | None:
        """The user's values over the fixed defaults, for callers that choose nothing automatically."""
        return TrainingConfig(**self.explicit) if self.explicit is not None else None


def known_modules_for(model_dir: str | None) -> tuple[str, ...] | None:
    """The module names LoRA can target for a local model directory, or None when unknown."""
    if not model_dir:
        return None
    config = Path(model_dir) / "config.json"
    if not config.exists():
        return None
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    return KNOWN_MODULES.get(model_type)


def build_config(data: dict[str, Any], *, catalog: dict[str, Any], default_model: str, model_dirs: dict[str, str | None]) -> ConfigResult:
    """Validate raw settings (strings from a form or JSON values) into a TrainingConfig."""
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    unknown = sorted(set(data) - set(RANGES) - set(POSITIVE) - {"base_model", "target_modules"})
    for name in unknown:
        errors[name] = SERVER_CHOSEN.get(name) or (
            f"Unknown setting. Known settings: base_model, target_modules, {', '.join([*RANGES, *POSITIVE])}."
        )
    base_model = data.get("base_model") or default_model
    if not isinstance(base_model, str) or base_model not in catalog:
        errors["base_model"] = f"Unknown base model {base_model!r}. Choose one of: {', '.join(catalog)}."
    values["base_model"] = base_model
    for name, spec in RANGES.items():
        raw = data.get(name)
        if raw is None or raw == "":
            continue
        value, error = _coerce(raw, spec)
        if error:
            errors[name] = error
        else:
            values[name] = value
    for name, (bound, _) in POSITIVE.items():
        raw = data.get(name)
        if raw is None or raw == "":
            continue
        value, error = _coerce(raw, Field(float, 0, bound, name, ""))
        if error is None and value <= 0:
            error = f"Must be greater than 0 and at most {bound:g}."
        if error:
            errors[name] = error
        else:
            values[name] = value
    if "learning_rate" in values and "learning_rate_multiplier" in values:
        errors["learning_rate_multiplier"] = (
            "Set either learning_rate or learning_rate_multiplier (which scales the chosen rate), not both."
        )
    modules = _parse_modules(data.get("target_modules"))
    if isinstance(modules, str):
        errors["target_modules"] = modules
    elif modules is not None:
        known = known_modules_for(model_dirs.get(base_model)) if "base_model" not in errors else None
        if known is not None:
            bad = [m for m in modules if m not in known]
            if bad:
                errors["target_modules"] = (
                    f"Unknown module{'s' if len(bad) > 1 else ''} {', '.join(bad)} for this model. Known: {', '.join(known)}."
                )
        values["target_modules"] = modules
    if errors:
        return ConfigResult(None, errors)
    return ConfigResult(values)


def _coerce(raw: Any, spec: Field) -> tuple[Any, str | None]:
    if isinstance(raw, bool):
        return None, "Must be a number."
    shown = repr(raw)
    shown = shown if len(shown) <= 40 else f"{shown[:40]}..."
    try:
        value = float(raw)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond any float
        return None, f"Must be a number, got {shown}."
    if not math.isfinite(value):  # "inf", "nan", 1e309
        return None, f"Must be a finite number between {spec.minimum:g} and {spec.maximum:g}, got {shown}."
    if spec.kind is int:
        if value != int(value):
            return None, "Must be a whole number."
        value = int(value)
    if not spec.minimum <= value <= spec.maximum:
        return None, f"Must be between {spec.minimum:g} and {spec.maximum:g}."
    return value, None


def _parse_modules(raw: Any) -> tuple[str, ...] | str | None:
    if raw is None or raw == "" or raw == []:
        return None
    if isinstance(raw, str):
        items = [part.strip() for part in raw.replace(" ", ",").split(",") if part.strip()]
    elif isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw):
        items = [x.strip() for x in raw if x.strip()]
    else:
        return "A list of module names, e.g. q_proj, v_proj."
    if not items:
        return "Name at least one module, e.g. q_proj, v_proj."
    return tuple(dict.fromkeys(items))
