from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from tuna_core.costs import cost_usd
from tuna_core.models import WorkerJob, job_statuses, status_field


class TrainingJob(WorkerJob):
    # The running state is stored, shown and answered by the API as "training" (the seed's name).
    Status = job_statuses("training", qualname="TrainingJob.Status")
    WORK_FUNCTION = "training_app.services.training_job_work"
    # Called by tuna_core.jobs.job_fail with the pk of a job that failed because the database stayed away: resumes it once.
    AUTO_RESUME_FUNCTION = "training_app.services.training_job_auto_resume"
    WORK = "Training"
    WORKER_STOPPED = (
        "The worker stopped while this job was running (it was restarted or crashed). Resume the job to continue from its last checkpoint."
    )

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="training_jobs")
    dataset = models.ForeignKey("datasets_app.Dataset", on_delete=models.RESTRICT, related_name="training_jobs")
    base_model = models.CharField(max_length=200)
    config = models.JSONField(default=dict)
    # Why each setting has its value: "set by you" or the reason it was chosen from the data and model.
    config_reasons = models.JSONField(default=dict, blank=True)

    class Method(models.TextChoices):
        SFT = "sft", "Supervised fine-tuning (LoRA)"
        DPO = "dpo", "Preference tuning (DPO)"

    method = models.CharField(max_length=8, choices=Method.choices, default=Method.SFT)
    # A preference-tuning run: the evaluation whose votes (and judge verdicts) it learns from, and the pairs as
    # they were when it started ([{"messages", "chosen", "rejected", "source", "example_index"}]), so a resume or
    # a later look sees exactly what it trained on even after more votes or a deleted evaluation.
    source_evaluation = models.ForeignKey(
        "evaluation_app.Evaluation", on_delete=models.SET_NULL, null=True, blank=True, related_name="preference_jobs"
    )
    # The pairs of a preference-tuning run as they were when it started: from votes ({"messages", "chosen",
    # "rejected" as text, "source", "example_index"}) or from a preference file ({"messages", "tools", "chosen",
    # "rejected" as assistant messages, "example_index"}), so a resume or a later look sees exactly what it
    # trained on.
    preference_pairs = models.JSONField(default=list, blank=True)
    # A "continue training" run, a preference-tuning run and a fine-tune started from a fine-tune all start from
    # their parent's adapter; only a continued run's steps follow the parent's (step_offset > 0).
    parent = models.ForeignKey("self", on_delete=models.RESTRICT, null=True, blank=True, related_name="continuations")
    step_offset = models.PositiveIntegerField(default=0, help_text="Updates before this run (its parent's, for a continued run).")
    status = status_field(Status)
    cancel_requested = models.BooleanField(default=False)
    current_step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    epoch = models.FloatField(default=0)
    tokens_seen = models.BigIntegerField(default=0)
    tokens_per_second = models.FloatField(null=True, blank=True)
    # Wall-clock seconds the worker spent on this job over every run, model loading included
    # (what the machine is billed for); a resumed job adds to it. It is the job's run time: written at
    # every step, so a crash keeps what was spent.
    train_seconds = models.FloatField(default=0)
    run_seconds = None
    eta_seconds = models.FloatField(null=True, blank=True)
    # Of train_seconds, the time spent measuring validation loss.
    eval_seconds = models.FloatField(default=0)
    best_step = models.PositiveIntegerField(null=True, blank=True, help_text="Step of the checkpoint kept (lowest validation loss).")
    best_eval_loss = models.FloatField(null=True, blank=True)
    device = models.CharField(max_length=32, blank=True)
    adapter_dir = models.CharField(max_length=500, blank=True)
    resume_count = models.PositiveIntegerField(default=0)
    # Resumes the worker made on its own (a run that failed because the database stayed unreachable past TUNA_DB_RETRY_S;
    # a full disk is not resumed by itself); at most MAX_AUTO_RESUMES, so a job that keeps failing waits for its owner.
    auto_resumes = models.PositiveIntegerField(default=0)
    # Added to the fine-tune's name (fine_tuned_model); letters, digits, "-", "_" and "." only.
    suffix = models.CharField(max_length=64, blank=True)
    # The caller's own labels: at most 16 string pairs (OpenAI's metadata).
    metadata = models.JSONField(default=dict, blank=True)
    # Why a failed job failed, in OpenAI's terms: a code ("invalid_training_file") and the request field at fault.
    error_code = models.CharField(max_length=64, blank=True)
    error_param = models.CharField(max_length=200, blank=True)
    # Paused: asked to stop with a checkpoint at the step where it stops, to resume from it later. While the run
    # stops it is still "training"; once stopped it is "cancelled" with this flag, shown (and answered) as paused.
    paused = models.BooleanField(default=False)
    # A run of a sweep (an Experiment): its settings are one point of the experiment's grid.
    experiment = models.ForeignKey("Experiment", on_delete=models.SET_NULL, null=True, blank=True, related_name="runs")
    # Why a run stopped before its last step on purpose (a sweep's early stop on validation loss), in words.
    stop_reason = models.TextField(blank=True)
    # Where this job's metrics are tracked: {"tensorboard": "<dir relative to TUNA_DATA_DIR>",
    # "mlflow": {"tracking_uri", "experiment_id", "run_id"}, "wandb": {"project", "run_id"}}; a resumed or continued
    # job continues the runs named here.
    tracking = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return f"Job #{self.pk} ({self.get_status_display()})"

    def get_absolute_url(self) -> str:
        return reverse("training-detail", args=[self.pk])

    def task_name(self) -> str:
        return f"training-job-{self.pk}-{self.resume_count}"  # a resumed job is a new task

    def stop_fields(self) -> dict:
        return {"eta_seconds": None}

    @property
    def model_id(self) -> str:
        """The id the OpenAI-compatible API knows this fine-tune by."""
        return f"tuna-job-{self.pk}"

    @property
    def fine_tuned_model(self) -> str:
        """The OpenAI-style name of this fine-tune (the suffix may be empty)."""
        return f"ft:{self.base_model}:{self.owner.username}:{self.suffix}:ftjob-{self.pk}"

    def checkpoint_model(self, step: int) -> str:
        """The OpenAI-style name of the checkpoint this run saved at `step` (its own step count)."""
        return f"{self.fine_tuned_model}:ckpt-step-{step}"

    @property
    def is_preference(self) -> bool:
        return self.method == self.Method.DPO

    @property
    def is_file_preference(self) -> bool:
        """Preference-tuned on a preference file's pairs (not on an evaluation's votes)."""
        return self.is_preference and bool(self.preference_pairs) and self.preference_pairs[0].get("source") == "file"

    @property
    def is_continuation(self) -> bool:
        """A "continue training" run: its steps and loss history follow its parent's."""
        return self.parent_id is not None and not self.is_preference and self.step_offset > 0

    @property
    def is_paused(self) -> bool:
        return self.paused and self.status == self.Status.CANCELLED

    @property
    def is_pausing(self) -> bool:
        return self.paused and self.status == self.Status.RUNNING

    @property
    def status_label(self) -> str:
        """The status as pages show it: a paused job is "Paused", not "Cancelled"."""
        if self.is_paused:
            return "Paused"
        if self.is_pausing:
            return "Pausing"
        return self.get_status_display()

    def progress_counts(self) -> tuple[float, float]:
        return self.current_step, self.total_steps

    def share_eval_seconds(self) -> float:
        """Share of the worker's time on this job that went to validation loss."""
        return self.eval_seconds / self.train_seconds if self.train_seconds else 0.0

    def best_step_text(self) -> str:
        if self.best_step is None:
            return "last step (no validation)"
        return f"step {self.best_step} of {self.current_step}"

    @property
    def cost_usd(self) -> float:
        """Measured worker time at the configured hourly price, per GPU on a run over several GPUs (as its estimate;
        a CPU's processes share one machine)."""
        devices = max(1, int((self.config or {}).get("processes") or 1)) if (self.device or "").startswith("cuda") else 1
        return cost_usd(self.train_seconds * devices)


class Experiment(models.Model):
    """A sweep: several ordinary fine-tunes of one dataset, with settings around the user's choice (the grid), queued
    fairly with everyone's jobs. The winner is picked on validation loss (never on the scored held-out examples),
    evaluated against the base model, and offered to serve and export."""

    class Status(models.TextChoices):
        RUNNING = "running", "Running"  # some run is queued or training
        COMPLETED = "completed", "Completed"  # every run has ended and a winner was picked
        FAILED = "failed", "Failed"  # every run has ended and none can be picked (none completed with a validation loss)
        CANCELLED = "cancelled", "Cancelled"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="experiments")
    dataset = models.ForeignKey("datasets_app.Dataset", on_delete=models.CASCADE, related_name="experiments")
    name = models.CharField(max_length=200, blank=True)
    base_model = models.CharField(max_length=200)
    # The settings the user chose (as on the training form); each run is these with its grid point's values.
    base_config = models.JSONField(default=dict, blank=True)
    # One dict of settings per run, e.g. [{"learning_rate": 2e-4, "num_epochs": 3, "lora_r": 16, "lora_layers": "all"}].
    grid = models.JSONField(default=list)
    # The estimate shown before starting: {"seconds", "cost_usd", "steps", "runs": [{"seconds", "steps"}]}.
    estimate = models.JSONField(default=dict, blank=True)
    early_stopping = models.BooleanField(default=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    winner = models.ForeignKey(TrainingJob, on_delete=models.SET_NULL, null=True, blank=True, related_name="won_experiments")
    # How the winner was picked: {"metric": "best_eval_loss", "compared": [{"job", "eval_loss", "status", "stop_reason"}],
    # "left_out": [{"job", "why"}], "reason": "..."}.
    pick = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return f"Experiment #{self.pk} on {self.dataset_id}"

    def get_absolute_url(self) -> str:
        return reverse("experiment-detail", args=[self.pk])


class LossPoint(models.Model):
    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="loss_points")
    step = models.PositiveIntegerField()
    epoch = models.FloatField()
    loss = models.FloatField(null=True, blank=True)
    eval_loss = models.FloatField(null=True, blank=True)
    learning_rate = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["step", "id"]
        indexes = [models.Index(fields=["job", "step"])]

    def __str__(self) -> str:
        return f"job {self.job_id} step {self.step}"


class ThroughputMeasurement(models.Model):
    """A measured training speed: what every time and cost estimate is computed from."""

    base_model = models.CharField(max_length=200)
    device = models.CharField(max_length=32)
    tokens_per_second = models.FloatField()
    source = models.CharField(max_length=200)
    measured_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-measured_at", "-id"]
        get_latest_by = "measured_at"

    def __str__(self) -> str:
        return f"{self.base_model} on {self.device}: {self.tokens_per_second:.0f} tokens/s ({self.source})"


class Export(WorkerJob):
    """A completed fine-tune exported for other runtimes (merged weights, GGUF, Ollama), then checked:
    the held-out prompts through the exported GGUF in llama.cpp against the PyTorch answers."""

    class Format(models.TextChoices):
        MERGED_SAFETENSORS = "merged_safetensors", "Merged weights (safetensors, for transformers and vLLM)"
        GGUF_F16 = "gguf_f16", "GGUF f16: the base model and the adapter as a LoRA GGUF (llama.cpp, Ollama)"
        GGUF_Q8_0 = "gguf_q8_0", "GGUF q8_0: the base model, and the fine-tune merged into one file"
        GGUF_Q5_K_M = "gguf_q5_k_m", "GGUF Q5_K_M: the fine-tune merged and quantized to about 5 bits (answers may differ)"
        GGUF_Q4_K_M = "gguf_q4_k_m", "GGUF Q4_K_M: the fine-tune merged and quantized to about 4 bits (smallest; answers differ more)"

    WORK_FUNCTION = "training_app.exports.export_work"
    WORK = "The export"
    WORKER_STOPPED = "The worker stopped while this export was running. Start the export again."
    # The share of held-out prompts whose f16 GGUF answer must equal the PyTorch answer for the export to
    # pass its parity check (and be served by llama.cpp when TUNA_SERVING_ENGINE=auto).
    PARITY_PASS = 0.95

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="exports")
    training_job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="exports")
    formats = models.JSONField(default=list)
    stage = models.CharField(max_length=200, blank=True, help_text="What the export is doing now.")
    progress = models.FloatField(default=0, help_text="0 to 1.")
    # [{"name": "adapter-f16.gguf", "kind": "gguf_lora", "size_bytes": 123, "path": "<relative to TUNA_DATA_DIR>"}]
    files = models.JSONField(default=list, blank=True)
    # {"f16": {"identical", "total", "exact_match_pytorch", "exact_match_gguf", "tokens_per_second_pytorch",
    #          "tokens_per_second_gguf", "mismatches": [...]}, "q8_0": {...},
    #  "q4_k_m": {..., "quantization": {"type": "Q4_K_M", "bits": 4, "fallbacks": {"q4_K -> q5_0": 90}}}, "q5_k_m": {...}}
    parity = models.JSONField(default=dict, blank=True)
    llama_cpp_version = models.CharField(max_length=32, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"Export #{self.pk} of job #{self.training_job_id} ({self.get_status_display()})"

    def progress_counts(self) -> tuple[float, float]:
        return self.progress, 1.0

    @property
    def parity_passed(self) -> bool:
        f16 = self.parity.get("f16") or {}
        return self.status == self.Status.COMPLETED and bool(f16.get("total")) and f16["identical"] / f16["total"] >= self.PARITY_PASS

    def file(self, kind: str) -> dict | None:
        return next((f for f in self.files if f["kind"] == kind), None)
