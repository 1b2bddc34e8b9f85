"""Reads for the usage log."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Avg, Count, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from inference_app.models import UsageLog
from tuna_llm.loading import deployment_precision

DAYS = 14


def usage_summary(user) -> dict:
    logs = UsageLog.objects.filter(user=user)
    ok = Q(status=UsageLog.Status.OK)
    totals = logs.aggregate(
        calls=Count("id"),
        errors=Count("id", filter=Q(status=UsageLog.Status.ERROR)),
        prompt_tokens=Sum("prompt_tokens"),
        completion_tokens=Sum("completion_tokens"),
        cost_usd=Sum("cost_usd"),  # each row's cost is its compute time at the price
        compute_ms=Sum("compute_ms"),
        latency_ms=Avg("latency_ms", filter=ok),
        queue_ms=Avg("queue_ms", filter=ok),
    )
    by_model = list(
        logs.values("model_id", "engine", "precision")  # a model served by both engines (or precisions) shows both
        .annotate(
            calls=Count("id"),
            tokens=Sum("completion_tokens"),
            cost_usd=Sum("cost_usd"),
            compute_ms=Sum("compute_ms"),
            # Refused calls have no timings: they would pull the means towards zero.
            latency_ms=Avg("latency_ms", filter=ok),
            queue_ms=Avg("queue_ms", filter=ok),
        )
        .order_by("-calls", "model_id", "engine", "precision")
    )
    since = timezone.now().date() - timedelta(days=DAYS - 1)
    daily = (
        logs.filter(created_at__date__gte=since)
        .annotate(day=TruncDate("created_at"))
        .values("day", "model_id")
        .annotate(calls=Count("id"))
        .order_by("day")
    )
    days = [since + timedelta(days=i) for i in range(DAYS)]
    models = sorted({row["model_id"] for row in daily})
    counts = {(row["day"], row["model_id"]): row["calls"] for row in daily}
    palette = ["#2456d6", "#1f8a4c", "#c0392b", "#b76e00", "#6b4bb8", "#2a6fb0", "#5f6b7a"]
    chart = {
        "labels": [d.isoformat() for d in days],
        "datasets": [
            {"label": m, "data": [counts.get((d, m), 0) for d in days], "backgroundColor": palette[i % len(palette)], "stack": "calls"}
            for i, m in enumerate(models)
        ],
    }
    return {
        "totals": totals,
        "by_model": by_model,
        "chart": chart,
        "recent": logs[:20],
        "days": DAYS,
        "precision": deployment_precision(),
    }
