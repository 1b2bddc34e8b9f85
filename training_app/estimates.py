"""Training time and cost estimates from measured throughput, never from constants.

The speed is the median of the recent measurements for the base model (a single run on a busy machine
must not swing the estimate), and the spread of those measurements says how sure the estimate is.
The work counted is what the job will run: its updates (max_steps included), each example cut at
max_seq_length, and the validation-loss passes.

A run on several processes (config.processes, DDP) counts the same examples and updates (each process takes its share
of every update). A measurement is one device's speed (per_device_speed): on CUDA each process has a GPU of its own, so
N processes train at about N times one's speed; on a CPU the processes share the machine's cores, so they train at the
machine's speed, which is what a run on one process measures (parallel_factor).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from django.conf import settings

from training_app.models import ThroughputMeasurement
from tuna_core.costs import cost_usd
from tuna_llm.autoconfig import VALIDATION_COST
from tuna_llm.training import steps_per_epoch, total_steps
from tuna_llm.training_config import TrainingConfig

RECENT_MEASUREMENTS = 5


def latest_throughput(base_model: str) -> ThroughputMeasurement | None:
    return ThroughputMeasurement.objects.filter(base_model=base_model).order_by("-measured_at", "-id").first()


def recent_speeds(base_model: str) -> list[float]:
    return list(
        ThroughputMeasurement.objects.filter(base_model=base_model)
        .order_by("-measured_at", "-id")
        .values_list("tokens_per_second", flat=True)[:RECENT_MEASUREMENTS]
    )


def parallel_factor(device: str, processes: int) -> int:
    """How many devices' speed a run on `processes` processes trains at (see the module's docstring)."""
    return max(1, processes) if device.startswith("cuda") else 1


def per_device_speed(tokens_per_second: float, device: str, processes: int) -> float:
    """The speed to record for a run that trained at `tokens_per_second` on `processes` processes, all counted."""
    return tokens_per_second / parallel_factor(device, processes)


def _tokens_per_epoch(split: dict[str, Any], max_seq_length: int, trained_share: float) -> int:
    counts = split.get("train_length_counts")
    if counts:
        tokens = sum(min(int(length), max_seq_length) * n for length, n in counts.items())
    else:  # datasets uploaded before lengths were kept: counted at the default 512
        tokens = int(split.get("train_tokens", 0))
    return round(tokens * trained_share)


def training_estimate(*, dataset, config: TrainingConfig) -> dict[str, Any]:
    split = dataset.validation_report.get("split", {})
    trained = max(1, dataset.num_train - config.eval_examples)
    per_epoch_tokens = _tokens_per_epoch(split, config.max_seq_length, trained / max(1, dataset.num_train))
    per_epoch = steps_per_epoch(config, trained)
    updates = total_steps(config, trained)
    tokens = round(per_epoch_tokens * updates / per_epoch)
    evaluations = (2 + updates // config.eval_steps) if config.eval_examples and config.eval_steps else 0
    eval_tokens = evaluations * config.eval_examples * per_epoch_tokens / trained
    speeds = recent_speeds(config.base_model)
    base = {
        "tokens": tokens,
        "updates": updates,
        "epochs": config.num_epochs,
        "evaluations": evaluations,
        "max_steps": config.max_steps,
        "processes": config.processes,
        "effective_batch": config.effective_batch,
    }
    if not speeds:
        return {
            **base,
            "available": False,
            "reason": f"No training speed has been measured for {config.base_model} yet: the first training job "
            "(or python manage.py tuna_models --calibrate) measures it.",
        }

    latest = latest_throughput(config.base_model)
    factor = parallel_factor(latest.device, config.processes)

    def seconds_at(speed: float) -> float:
        return (tokens + eval_tokens * VALIDATION_COST) / (speed * factor)

    speed = statistics.median(speeds)
    seconds = seconds_at(speed)
    return {
        **base,
        "available": True,
        "seconds": seconds,
        "eval_seconds": eval_tokens * VALIDATION_COST / (speed * factor),
        "low_seconds": seconds_at(max(speeds)),
        "high_seconds": seconds_at(min(speeds)),
        "cost_usd": cost_usd(seconds * factor),  # TUNA_GPU_HOURLY_USD is per GPU: N GPUs for the time cost N times one
        "tokens_per_second": speed * factor,
        "device_tokens_per_second": speed,
        "parallel_factor": factor,
        "measurements": len(speeds),
        "certainty": _certainty(speeds),
        "device": latest.device,
        "source": latest.source,
        "measured_at": latest.measured_at,
        "hourly_usd": settings.TUNA_GPU_HOURLY_USD,
    }


def _certainty(speeds: list[float]) -> str:
    if len(speeds) < 3:
        return f"from {len(speeds)} measurement{'s' if len(speeds) != 1 else ''}: a rough guess"
    spread = (max(speeds) - min(speeds)) / statistics.median(speeds)
    if spread <= 0.2:
        return f"the last {len(speeds)} runs agree within {math.ceil(spread * 100)}%"
    return f"the last {len(speeds)} runs differ by up to {math.ceil(spread * 100)}%: the machine's speed varies"
