"""The one price every cost figure is computed from: measured seconds at TUNA_GPU_HOURLY_USD."""

from django.conf import settings

from tuna_llm.metrics import cost_at


def cost_usd(seconds: float) -> float:
    return cost_at(seconds, settings.TUNA_GPU_HOURLY_USD)
