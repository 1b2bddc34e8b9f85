"""What one training job may ask for: the server's caps on epochs, batch size, sequence length and updates.

The caps are settings (docs/configuration.md); a value the user set over a cap is an error naming the cap,
a value the product chose is lowered to it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from django.conf import settings

from tuna_llm.autoconfig import DataFacts, choose_settings
from tuna_llm.training import total_steps
from tuna_llm.training_config import TrainingConfig


def _caps(context: int | None) -> dict[str, tuple[int, str]]:
    """The most each bounded setting may be, and why."""
    seq, seq_why = settings.TUNA_MAX_SEQ_LENGTH, "TUNA_MAX_SEQ_LENGTH"
    if context and context < seq:
        seq, seq_why = context, "the base model's context"
    return {
        "num_epochs": (settings.TUNA_MAX_EPOCHS, "TUNA_MAX_EPOCHS"),
        "batch_size": (settings.TUNA_MAX_BATCH_SIZE, "TUNA_MAX_BATCH_SIZE"),
        "max_seq_length": (seq, seq_why),
    }


def limited_settings(
    explicit: dict[str, Any], facts: DataFacts, *, base_model: str
) -> tuple[TrainingConfig | None, dict[str, str], dict[str, str]]:
    """choose_settings within the server's limits: (config, reasons, errors).

    A value the user set over a limit is an error naming the limit; a chosen one is lowered to it, and its
    reason says so. A run longer than TUNA_MAX_STEPS_PER_JOB updates is refused when the user set its length
    (epochs or max_steps), and otherwise ends at the limit (max_steps).
    """
    caps = _caps(facts.context)
    errors = {
        name: f"At most {cap} on this server ({why}); got {explicit[name]}."
        for name, (cap, why) in caps.items()
        if name in explicit and explicit[name] > cap
    }
    if errors:
        return None, {}, errors
    config, reasons = choose_settings(explicit, facts, base_model=base_model)
    capped = {name: cap for name, (cap, _) in caps.items() if getattr(config, name) > cap}
    if capped:
        config, reasons = _rechoose(explicit, capped, facts, base_model, caps)
    updates = total_steps(config, max(1, facts.train_pool - config.eval_examples))
    step_limit = settings.TUNA_MAX_STEPS_PER_JOB
    if updates > step_limit:
        if "max_steps" in explicit or "num_epochs" in explicit:
            name = "max_steps" if "max_steps" in explicit else "num_epochs"
            message = (
                f"This run would take {updates} updates; the limit is {step_limit} per job (TUNA_MAX_STEPS_PER_JOB). "
                "Lower num_epochs, raise batch_size, or set max_steps."
            )
            return None, {}, {name: message}
        config, reasons = _rechoose(explicit, {**capped, "max_steps": step_limit}, facts, base_model, caps)
    return config, reasons, {}


def _rechoose(explicit, capped: dict[str, int], facts: DataFacts, base_model: str, caps) -> tuple[TrainingConfig, dict[str, str]]:
    config, reasons = choose_settings({**explicit, **capped}, facts, base_model=base_model)
    for name, cap in capped.items():
        why = caps[name][1] if name in caps else "TUNA_MAX_STEPS_PER_JOB"
        reasons[name] = f"{cap}: the most this server allows ({why})"
    return config, reasons


def check_epochs(epochs: int, config: TrainingConfig, train_rows: int) -> dict[str, str]:
    """Errors for a continued run of `epochs` more epochs with `config`'s batch settings."""
    if epochs > settings.TUNA_MAX_EPOCHS:
        return {"epochs": f"At most {settings.TUNA_MAX_EPOCHS} on this server (TUNA_MAX_EPOCHS); got {epochs}."}
    updates = total_steps(replace(config, num_epochs=epochs, max_steps=0), train_rows)
    if updates > settings.TUNA_MAX_STEPS_PER_JOB:
        return {
            "epochs": f"{epochs} more epochs would take {updates} updates; the limit is {settings.TUNA_MAX_STEPS_PER_JOB} "
            "per job (TUNA_MAX_STEPS_PER_JOB)."
        }
    return {}


def check_preference_limits(config: TrainingConfig, pairs: int, explicit: dict[str, Any]) -> dict[str, str]:
    """Errors for a preference-tuning run on `pairs` pairs with `config`, by the setting at fault (the server's caps)."""
    caps = _caps(None)
    errors = {
        name: f"At most {cap} on this server ({why}); got {getattr(config, name)}."
        for name, (cap, why) in caps.items()
        if getattr(config, name) > cap
    }
    updates = total_steps(config, pairs)
    if not errors and updates > settings.TUNA_MAX_STEPS_PER_JOB:
        name = "max_steps" if "max_steps" in explicit else "num_epochs"
        errors[name] = (
            f"This run would take {updates} updates; the limit is {settings.TUNA_MAX_STEPS_PER_JOB} per job (TUNA_MAX_STEPS_PER_JOB). "
            "Lower num_epochs, raise batch_size, or set max_steps."
        )
    return errors
