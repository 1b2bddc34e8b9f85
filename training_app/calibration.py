"""Measure training speed on this machine, so estimates are computed from a measurement."""

from __future__ import annotations

import tempfile
from pathlib import Path

from datasets_app.examples import SAMPLE_PATH, file_examples
from training_app.models import ThroughputMeasurement
from tuna_llm.autoconfig import DataFacts, choose_settings, model_facts
from tuna_llm.catalog import get_base_model_spec
from tuna_llm.loading import pick_device
from tuna_llm.training import run_lora_training

CALIBRATION_STEPS = 8


def calibrate_default_model() -> ThroughputMeasurement:
    """A few LoRA steps with the default settings on the sample data; records tokens per second."""

    spec = get_base_model_spec()
    plan = pick_device()
    examples = file_examples(SAMPLE_PATH)
    # The settings a default job on this data would use (adapter size changes the speed), for a few steps.
    facts = DataFacts(train_pool=len(examples), **model_facts(spec.config_dir()))
    config, _ = choose_settings({"max_steps": CALIBRATION_STEPS, "eval_examples": 0}, facts, base_model=spec.name)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_lora_training(config, spec=spec, plan=plan, train_examples=examples, output_dir=Path(tmp))
    return ThroughputMeasurement.objects.create(
        base_model=spec.name,
        device=plan.device,
        tokens_per_second=result.tokens_seen / result.train_seconds,
        source=f"calibration, {result.global_step} steps",
    )
