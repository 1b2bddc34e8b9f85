"""Training time and cost estimates from measured throughput, never from constants."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from training_app.models import ThroughputMeasurement

DEFAULT_EPOCHS = 3


def latest_throughput(base_model: str) -> ThroughputMeasurement | None:
    return ThroughputMeasurement.objects.filter(base_model=base_model).order_by("-measured_at", "-id").first()


def training_estimate(*, dataset, base_model: str | None = None, num_epochs: int = DEFAULT_EPOCHS) -> dict[str, Any]:
    base_model = base_model or settings.TUNA_DEFAULT_BASE_MODEL
    tokens = int(dataset.validation_report.get("split", {}).get("train_tokens", 0)) * num_epochs
    measurement = latest_throughput(base_model)
    if measurement is None:
        return {
            "available": False,
            "tokens": tokens,
            "reason": f"No training speed has been measured for {base_model} yet: the first training job "
            "(or python manage.py tuna_models --calibrate) measures it.",
        }
    seconds = tokens / measurement.tokens_per_second
    return {
        "available": True,
        "tokens": tokens,
        "seconds": seconds,
        "cost_usd": seconds / 3600 * settings.TUNA_GPU_HOURLY_USD,
        "tokens_per_second": measurement.tokens_per_second,
        "device": measurement.device,
        "source": measurement.source,
        "measured_at": measurement.measured_at,
        "epochs": num_epochs,
        "hourly_usd": settings.TUNA_GPU_HOURLY_USD,
    }
