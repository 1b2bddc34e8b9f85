"""Inference: resolve a model id for a user, generate, log the call."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from inference_app.catalog import UnknownBaseModel, get_base_model_spec, get_catalog
from inference_app.models import UsageLog
from inference_app.prompting import Message
from training_app.models import TrainingJob

BASE_PREFIX = "base:"
JOB_PREFIX = "tuna-job-"


class ModelNotFound(LookupError):
    pass


class ModelNotReady(RuntimeError):
    pass


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str  # the canonical public id: "base:<name>" or "tuna-job-<n>"
    base_model: str
    job: TrainingJob | None

    @property
    def adapter_name(self) -> str | None:
        return f"job-{self.job.pk}" if self.job else None


def resolve_model(user, model_id: str | int) -> ResolvedModel:
    """Accept a job id (int or "12"), "tuna-job-12", "base:<name>" or a bare catalog name."""
    raw = str(model_id).strip()
    if raw.startswith(BASE_PREFIX) or raw in get_catalog():
        name = raw.removeprefix(BASE_PREFIX)
        try:
            spec = get_base_model_spec(name)
        except UnknownBaseModel:
            raise ModelNotFound(f"No model {raw!r}.") from None
        return ResolvedModel(f"{BASE_PREFIX}{spec.name}", spec.name, None)
    number = raw.removeprefix(JOB_PREFIX)
    if not number.isdigit():
        raise ModelNotFound(f"No model {raw!r}. Use a training job id, tuna-job-<id> or base:<name>.")
    job = TrainingJob.objects.filter(pk=int(number), owner=user).first()
    if job is None:
        raise ModelNotFound(f"No model {raw!r}.")
    if job.status != TrainingJob.Status.COMPLETED or not job.adapter_dir:
        raise ModelNotReady(f"Model {job.model_id} is not ready: its training job is {job.get_status_display().lower()}.")
    return ResolvedModel(job.model_id, job.base_model, job)


def completed_models_for(user) -> list[TrainingJob]:
    return list(TrainingJob.objects.filter(owner=user, status=TrainingJob.Status.COMPLETED).select_related("dataset"))


def cost_for(latency_ms: float) -> float:
    """Measured time at the configured hourly price."""
    return latency_ms / 1000 / 3600 * settings.TUNA_GPU_HOURLY_USD


def inference_generate(
    *,
    user,
    model: ResolvedModel,
    messages: list[Message],
    endpoint: str,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
):
    from inference_app.engine import generate_chat
    from inference_app.registry import registry

    try:
        loaded = registry.get(model.base_model)
        if model.job is not None:
            loaded.attach_adapter(model.adapter_name, model.job.adapter_dir)
        result = generate_chat(
            loaded,
            messages,
            adapter=model.adapter_name,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
    except Exception as exc:
        UsageLog.objects.create(user=user, model_id=model.model_id, endpoint=endpoint, status=UsageLog.Status.ERROR, error=str(exc)[:500])
        raise
    UsageLog.objects.create(
        user=user,
        model_id=model.model_id,
        endpoint=endpoint,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        latency_ms=result.latency_ms,
        cost_usd=cost_for(result.latency_ms),
    )
    return result
