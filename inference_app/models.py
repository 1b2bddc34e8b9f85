from django.conf import settings
from django.db import models


class UsageLog(models.Model):
    """One inference call: who, which model, how many tokens, how long (latency, queue wait, compute), and how it ended."""

    class Status(models.TextChoices):
        OK = "ok", "OK"
        ERROR = "error", "Error"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage_logs")
    model_id = models.CharField(max_length=200)
    endpoint = models.CharField(max_length=64)
    # Which runtime answered: "transformers" or "llama.cpp" (blank for a call refused before it was routed).
    engine = models.CharField(max_length=16, blank=True)
    # The numbers it computed in: "bf16" or "fp32" (transformers, TUNA_PRECISION), "gguf" (llama.cpp, the export's types).
    precision = models.CharField(max_length=8, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField(default=0)  # from its prefill's start to its own end
    queue_ms = models.FloatField(default=0)  # waiting to be admitted, before that
    compute_ms = models.FloatField(default=0)  # its share of the batch's time; cost_usd is computed from it
    cost_usd = models.FloatField(default=0)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.OK)
    finish_reason = models.CharField(max_length=16, blank=True, help_text='"stop", "length", or "cancelled" (the client went away).')
    error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["user", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.model_id} {self.endpoint} ({self.status})"
