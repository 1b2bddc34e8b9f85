"""Inference: resolve a model id for a user, check the request, generate (batched), log the call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from django.conf import settings

from inference_app.models import UsageLog
from training_app.models import TrainingJob
from tuna_llm.batching import GenerationRequest, engine_for
from tuna_llm.catalog import UnknownBaseModel, get_base_model_spec, get_catalog
from tuna_llm.loading import ModelUnavailable
from tuna_llm.prompting import Message, prompt_messages, render_chat
from tuna_llm.registry import registry
from tuna_site.costs import cost_usd

BASE_PREFIX = "base:"
JOB_PREFIX = "tuna-job-"
DEFAULT_MAX_TOKENS = 256
MIN_SAMPLING_TEMPERATURE = 1e-3


class InferenceRefused(Exception):
    """A call refused before generation; ``status`` is the HTTP answer, ``param`` the request field at fault."""

    status = 400
    param: str | None = None


class ModelNotFound(InferenceRefused, LookupError):
    status = 404


class ModelNotReady(InferenceRefused, RuntimeError):
    status = 409


class InferenceInvalid(InferenceRefused, ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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
            raise ModelNotFound(f"The model {raw!r} does not exist.") from None
        return ResolvedModel(f"{BASE_PREFIX}{spec.name}", spec.name, None)
    number = raw.removeprefix(JOB_PREFIX)
    job = TrainingJob.objects.filter(pk=int(number), owner=user).first() if number.isdigit() else None
    if job is None:
        raise ModelNotFound(f"The model {raw!r} does not exist. Use a training job id, tuna-job-<id> or base:<name>.")
    if job.status != TrainingJob.Status.COMPLETED or not job.adapter_dir:
        raise ModelNotReady(f"The model {job.model_id} is not ready: its training job is {job.get_status_display().lower()}.")
    return ResolvedModel(job.model_id, job.base_model, job)


def completed_models_for(user) -> list[TrainingJob]:
    return list(TrainingJob.objects.filter(owner=user, status=TrainingJob.Status.COMPLETED).select_related("dataset"))


def cost_for(compute_ms: float) -> float:
    """A request's compute time (its share of its batch, never its queue wait) at the configured hourly price."""
    return cost_usd(compute_ms / 1000)


def check_params(*, max_tokens, temperature=0.0, top_p=1.0) -> None:
    limit = settings.TUNA_MAX_TOKENS_LIMIT
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise InferenceInvalid(f"max_tokens must be a whole number from 1 to {limit}; got {max_tokens!r}.", "max_tokens")
    if not 0 <= temperature <= 2:
        raise InferenceInvalid(f"temperature must be between 0 and 2; got {temperature!r}.", "temperature")
    if not 0 < top_p <= 1:
        raise InferenceInvalid(f"top_p must be greater than 0 and at most 1; got {top_p!r}.", "top_p")


@dataclass
class Call:
    """A checked request, ready to run: model, loaded weights and the batching request."""

    user: object
    model: ResolvedModel
    request: object  # batching.GenerationRequest
    endpoint: str


def prepare_call(
    *,
    user,
    model: ResolvedModel,
    endpoint: str,
    messages: list[Message] | None = None,
    text: str | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | tuple[str, ...] = (),
) -> Call:
    """Render the prompt (chat template for messages, raw for text) and check it fits the context."""

    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, settings.TUNA_MAX_TOKENS_LIMIT)
    check_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    if temperature < MIN_SAMPLING_TEMPERATURE:
        # Sampling this cold is greedy decoding; dividing the logits by it would overflow to inf/nan.
        temperature = 0.0
    try:
        loaded = registry.get(model.base_model)
    except ModelUnavailable as exc:
        raise ModelNotReady(str(exc)) from exc
    prompt = render_chat(loaded.tokenizer, messages, add_generation_prompt=True) if messages is not None else text
    if not prompt or not prompt.strip():
        raise InferenceInvalid("The prompt is empty.", "prompt")
    context = getattr(loaded.base_model.config, "max_position_embeddings", None)
    prompt_tokens = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if context and prompt_tokens >= context:
        raise InferenceInvalid(f"The prompt is {prompt_tokens} tokens; this model's context holds {context}.", "prompt")
    request = GenerationRequest(
        text=prompt,
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=tuple(stop),
        adapter=model.adapter_name,
        adapter_path=model.job.adapter_dir if model.job else None,
    )
    return Call(user=user, model=model, request=request, endpoint=endpoint)


def checked_call(*, user, model_id: str | int, endpoint: str, **params) -> Call:
    """Resolve model_id and prepare the call (see prepare_call); a refused call is logged before it propagates."""
    with _refusals_logged(user=user, model_id=model_id, endpoint=endpoint):
        model = resolve_model(user, model_id)
    with _refusals_logged(user=user, model_id=model.model_id, endpoint=endpoint):
        return prepare_call(user=user, model=model, endpoint=endpoint, **params)


@dataclass(frozen=True)
class PlaygroundAnswer:
    label: str
    model_id: str
    result: object  # batching.GenerationResult
    cost_usd: float


def playground_compare(*, user, model_id: str, prompt: str, max_tokens: int) -> list[PlaygroundAnswer]:
    """The base model's answer and, for a fine-tuned model, its answer too, generated in one batch."""
    if not prompt:
        raise InferenceInvalid("Type a prompt first.", "prompt")
    model = resolve_model(user, model_id)
    models = [("Base model", resolve_model(user, f"{BASE_PREFIX}{model.base_model}"))]
    if model.job is not None:
        models.append((f"Fine-tuned ({model.model_id})", model))
    messages = prompt_messages(prompt)
    # Check every call before running any, so a prompt the model cannot take costs nothing.
    with _refusals_logged(user=user, model_id=model.model_id, endpoint="playground"):
        calls = [prepare_call(user=user, model=m, endpoint="playground", messages=messages, max_tokens=max_tokens) for _, m in models]
    # Together, so base and fine-tune share one batch: neither waits for the other, each is billed its share.
    results = run_calls(calls)
    return [
        PlaygroundAnswer(label, call.model.model_id, result, cost_for(result.compute_ms))
        for (label, _), call, result in zip(models, calls, results, strict=True)
    ]


def _engine(call: Call):
    return engine_for(registry.get(call.model.base_model))


def run_call(call: Call):
    return run_calls([call])[0]


def run_calls(calls: list[Call]) -> list:
    """Queue every call before waiting for any, so calls on one base model share a batch (and its time)."""
    by_engine: dict = {}
    for call in calls:
        try:
            engine = _engine(call)
        except Exception as exc:
            _log_error(call, exc)
            raise
        by_engine.setdefault(engine, []).append(call.request)
    for engine, requests in by_engine.items():
        engine.submit_all(requests)
    failure = None
    for call in calls:
        call.request.done.wait()
        if call.request.error is not None:
            _log_error(call, call.request.error)
            failure = failure or call.request.error
        else:
            _log(call, call.request.result)
    if failure is not None:
        raise failure
    return [call.request.result for call in calls]


def stream_call(call: Call) -> Iterator[str]:
    """Text pieces as they are generated; the usage is logged when the stream ends."""
    try:
        yield from _engine(call).stream(call.request)
    except Exception as exc:
        _log_error(call, exc)
        raise
    _log(call, call.request.result)


def _log(call: Call, result) -> None:
    UsageLog.objects.create(
        user=call.user,
        model_id=call.model.model_id,
        endpoint=call.endpoint,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        latency_ms=result.latency_ms,
        queue_ms=result.queue_ms,
        compute_ms=result.compute_ms,
        cost_usd=cost_for(result.compute_ms),
    )


def _log_error(call: Call, exc: Exception) -> None:
    UsageLog.objects.create(
        user=call.user, model_id=call.model.model_id, endpoint=call.endpoint, status=UsageLog.Status.ERROR, error=str(exc)[:500]
    )


def log_rejected(*, user, model_id: str | int, endpoint: str, error: str) -> None:
    """Requests refused before generation are logged too (with their reason)."""
    UsageLog.objects.create(user=user, model_id=str(model_id)[:200], endpoint=endpoint, status=UsageLog.Status.ERROR, error=error[:500])


@contextmanager
def _refusals_logged(*, user, model_id: str | int, endpoint: str) -> Iterator[None]:
    try:
        yield
    except InferenceRefused as exc:
        log_rejected(user=user, model_id=model_id, endpoint=endpoint, error=str(exc))
        raise
