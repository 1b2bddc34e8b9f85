from django.conf import settings
from django.db import models

from tuna_core.models import WorkerJob


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


class EngineCheck(WorkerJob):
    """A fine-tune's held-out prompts answered greedily by a remote engine (TUNA_REMOTE_ENGINES) and by transformers
    (the weights as trained and evaluated), counted side by side. TUNA_SERVING_ENGINE=auto serves a fine-tune through
    its base's remote engine only once a check on that engine passed (Export.PARITY_PASS of the answers identical)."""

    WORK_FUNCTION = "inference_app.remote_engines.engine_check_work"
    WORK = "The engine check"
    WORKER_STOPPED = "The worker stopped while this engine check was running. Start the check again."

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="engine_checks")
    training_job = models.ForeignKey("training_app.TrainingJob", on_delete=models.CASCADE, related_name="engine_checks")
    base_model = models.CharField(max_length=200)
    # Which engine was checked: "<kind> <url> <model>" (tuna_llm.serving.remote.RemoteEngineConfig.key); a check of
    # another engine, or of this one before its configuration changed, does not count.
    engine_key = models.CharField(max_length=500)
    engine_kind = models.CharField(max_length=16)
    done = models.PositiveIntegerField(default=0, help_text="Prompts answered by both so far.")
    total = models.PositiveIntegerField(default=0, help_text="Held-out prompts compared.")
    identical = models.PositiveIntegerField(null=True, blank=True, help_text="Answers equal to the transformers answers.")
    # tuna_llm.parity.parity_report: counts, exact match of each side, speeds and the differing answers side by side.
    report = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["training_job", "engine_key", "-completed_at"])]

    def __str__(self) -> str:
        return f"Engine check #{self.pk} of job #{self.training_job_id} on {self.engine_kind} ({self.get_status_display()})"

    def progress_counts(self) -> tuple[float, float]:
        return float(self.done), float(self.total)

    @property
    def passed(self) -> bool:
        from training_app.models import Export

        return self.status == self.Status.COMPLETED and bool(self.total) and (self.identical or 0) / self.total >= Export.PARITY_PASS
