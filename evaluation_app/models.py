from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse

from tuna_core.models import WorkerJob
from tuna_llm.prompting import Conversation


class Evaluation(WorkerJob):
    WORK_FUNCTION = "evaluation_app.services.evaluation_work"
    WORK = "The evaluation"
    WORKER_STOPPED = "The worker stopped while this evaluation was running. Start the evaluation again."

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="evaluations")
    training_job = models.ForeignKey("training_app.TrainingJob", on_delete=models.CASCADE, related_name="evaluations")
    # What the fine-tune is compared with: the base model (null), or another fine-tune's adapter (a preference-tuned
    # job is compared with the job it was tuned from). The "base_*" fields of the examples hold that side's answers.
    baseline_job = models.ForeignKey(
        "training_app.TrainingJob", on_delete=models.CASCADE, null=True, blank=True, related_name="baseline_evaluations"
    )
    test_size = models.PositiveIntegerField(default=0)
    done = models.PositiveIntegerField(default=0)
    max_new_tokens = models.PositiveIntegerField(default=0)
    # The precision both models' answers and losses were computed in (the deployment's, TUNA_PRECISION), in words.
    precision = models.CharField(max_length=200, blank=True)
    metrics = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"Evaluation #{self.pk} of job #{self.training_job_id}"

    def get_absolute_url(self) -> str:
        return reverse("evaluation-detail", args=[self.pk])

    def progress_counts(self) -> tuple[float, float]:
        return self.done, self.test_size

    @property
    def against_start(self) -> bool:
        """A preference-tuned job compared with where it started: its parent fine-tune, or the base model when it was
        tuned from the base (not any other comparison of that job, such as a run's score against the base)."""
        return self.training_job.is_preference and self.baseline_job_id == self.training_job.parent_id

    @property
    def baseline_label(self) -> str:
        """How pages name the side the fine-tune is compared with."""
        return f"Job #{self.baseline_job_id}" if self.baseline_job_id else "Base"

    @property
    def candidate_label(self) -> str:
        return f"Job #{self.training_job_id}" if self.baseline_job_id else "Fine-tuned"


class EvaluationExample(models.Model):
    evaluation = models.ForeignKey(Evaluation, on_delete=models.CASCADE, related_name="examples")
    index = models.PositiveIntegerField()
    messages = models.JSONField()  # the prompt as chat messages, exactly as both models saw it
    # The tools both models were offered with those messages (OpenAI tool objects); null when none were.
    tools = models.JSONField(null=True, blank=True)
    reference = models.TextField()  # the reference answer's text (its calls in the template's convention, if any)
    # The calls the reference answer makes ([{"name", "arguments": {...}}]); when there are any, answers are scored on them.
    reference_calls = models.JSONField(default=list, blank=True)
    base_output = models.TextField(blank=True)
    finetuned_output = models.TextField(blank=True)
    base_latency_ms = models.FloatField(default=0)
    finetuned_latency_ms = models.FloatField(default=0)
    base_prompt_tokens = models.PositiveIntegerField(default=0)
    finetuned_prompt_tokens = models.PositiveIntegerField(default=0)
    base_tokens = models.PositiveIntegerField(default=0)
    finetuned_tokens = models.PositiveIntegerField(default=0)
    base_cost_usd = models.FloatField(default=0)
    finetuned_cost_usd = models.FloatField(default=0)
    base_scores = models.JSONField(default=dict)
    finetuned_scores = models.JSONField(default=dict)
    # Blind mode: which side (A or B) shows the fine-tuned answer; drawn once, stored.
    finetuned_side = models.CharField(max_length=1, choices=[("A", "A"), ("B", "B")])

    class Meta:
        ordering = ["index"]
        constraints = [models.UniqueConstraint(fields=["evaluation", "index"], name="unique_example_index")]

    def __str__(self) -> str:
        return f"evaluation {self.evaluation_id} example {self.index}"

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""

    @property
    def conversation(self) -> Conversation:
        """The prompt as both models saw it: the messages with their tools."""
        return Conversation(self.messages, tools=self.tools)

    def side_output(self, side: str) -> str:
        return self.finetuned_output if side == self.finetuned_side else self.base_output

    def model_for_side(self, side: str) -> str:
        return "finetuned" if side == self.finetuned_side else "base"


class Rating(models.Model):
    class Choice(models.TextChoices):
        BASE = "base", "Base model"
        FINETUNED = "finetuned", "Fine-tuned model"
        TIE = "tie", "Tie"
        BOTH_BAD = "both_bad", "Both bad"

    example = models.ForeignKey(EvaluationExample, on_delete=models.CASCADE, related_name="ratings")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="ratings")
    preferred_model = models.CharField(max_length=16, choices=Choice.choices)
    # Whether the model names were hidden when this vote was cast (or last changed); only blind votes
    # count in the blind win rate. False by default: votes recorded before this field existed may have
    # been cast with the names shown, and counting an unknown vote as blind would overstate the result.
    blind = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["example", "user"], name="one_vote_per_user_per_example")]

    def __str__(self) -> str:
        return f"{self.user} prefers {self.preferred_model} on {self.example}"


class JudgeRun(WorkerJob):
    """A pairwise judge (an OpenAI-compatible chat endpoint) asked about every example of an evaluation, in both orders."""

    WORK_FUNCTION = "evaluation_app.judging.judge_work"
    WORK = "The judge"
    WORKER_STOPPED = "The worker stopped while the judge was running. Ask the judge again."

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="judge_runs")
    evaluation = models.ForeignKey(Evaluation, on_delete=models.CASCADE, related_name="judge_runs")
    # The endpoint as configured when the run started (the key is never stored).
    endpoint = models.CharField(max_length=500)
    judge_model = models.CharField(max_length=200)
    rubric = models.TextField()
    total = models.PositiveIntegerField(default=0)
    done = models.PositiveIntegerField(default=0)
    requests = models.PositiveIntegerField(default=0, help_text="Requests sent to the judge, retries included.")

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"Judge run #{self.pk} on evaluation #{self.evaluation_id}"

    def progress_counts(self) -> tuple[float, float]:
        return self.done, self.total


class JudgeVerdict(models.Model):
    """The judge's verdict on one example: both orders, and what they add up to."""

    class Winner(models.TextChoices):
        BASE = "base", "Base (or parent) model"
        FINETUNED = "finetuned", "Fine-tuned model"
        TIE = "tie", "Tie"

    run = models.ForeignKey(JudgeRun, on_delete=models.CASCADE, related_name="verdicts")
    example = models.ForeignKey(EvaluationExample, on_delete=models.CASCADE, related_name="verdicts")
    # Inconsistent orders (the judge picked a different model when the answers swapped places) count as a tie.
    winner = models.CharField(max_length=16, choices=Winner.choices)
    consistent = models.BooleanField()
    # Order 1 shows the base answer as A and the fine-tuned one as B; order 2 swaps them. Each is in model terms.
    base_first = models.CharField(max_length=16, choices=Winner.choices)
    finetuned_first = models.CharField(max_length=16, choices=Winner.choices)
    base_first_reason = models.TextField(blank=True)
    finetuned_first_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["example__index"]
        constraints = [models.UniqueConstraint(fields=["run", "example"], name="one_verdict_per_run_per_example")]

    def __str__(self) -> str:
        return f"judge run {self.run_id}: {self.winner} on {self.example}"
