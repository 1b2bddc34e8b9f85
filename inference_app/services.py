"""Inference: resolve a model id for a user, choose its engine, check the request, generate, log the call.

The engine of a call is chosen in one place (inference_app.engines.engine_for) and used through one
interface (tuna_llm.serving.engine): every call is checked, admitted, logged and billed the same way.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from django.conf import settings

from inference_app import engines
from inference_app.engines import TRANSFORMERS
from inference_app.models import UsageLog
from training_app import selectors as training_selectors
from training_app.models import TrainingJob
from tuna_core.admission import Slots, Ticket, TooManyAtOnce
from tuna_core.costs import cost_usd
from tuna_core.errors import Conflict, Invalid, NotFound, Unavailable, UserError
from tuna_llm.catalog import UnknownBaseModel, get_base_model_spec, get_catalog
from tuna_llm.prompting import ChatTemplateRefused, Message, ToolsUnsupported, prompt_messages
from tuna_llm.serving.batching import MAX_SEED, MIN_SEED
from tuna_llm.serving.engine import CallSpec, Engine, Generation, Handle, RequestInvalid, result_of
from tuna_llm.serving.openai_engine import EngineUnavailable

BASE_PREFIX = "base:"
JOB_PREFIX = "tuna-job-"
FT_PREFIX = "ft:"
NAMES = "Use a training job id, tuna-job-<id>, its ft:... name (or that name with :ckpt-step-<n>) or base:<name>."
DEFAULT_MAX_TOKENS = 256
MAX_JOB_ID_DIGITS = 18  # "tuna-job-<id>": ids beyond this cannot exist (64-bit keys)
MIN_SAMPLING_TEMPERATURE = 1e-3
MODEL_ID_LENGTH = UsageLog._meta.get_field("model_id").max_length  # a long ft: name is logged cut to fit
# Before a prompt is rendered and tokenized, its text is refused when it holds more than this many characters per
# allowed prompt token (TUNA_MAX_PROMPT_TOKENS): tokenizing megabytes takes seconds, and no ordinary text comes near
# it (English is about 4 characters a token, code about 3). Under it, the exact count decides.
MAX_CHARS_PER_TOKEN = 16


class InferenceRefused(UserError):
    """A call refused before generation; its kind (below) decides the answer, ``param`` names the field at fault."""


class ModelNotFound(InferenceRefused, NotFound, LookupError):
    code = "model_not_found"


class ModelNotReady(InferenceRefused, Conflict, RuntimeError):
    code = "model_not_ready"


class InferenceBusy(InferenceRefused, Unavailable, RuntimeError):
    """More calls are waiting for generation in this process than TUNA_MAX_INFERENCE_QUEUE allows."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)


class InferenceUnavailable(InferenceRefused, Unavailable, RuntimeError):
    """The engine serving the model cannot be reached now (a llama-server restarting, a remote engine down)."""

    @classmethod
    def of(cls, exc: EngineUnavailable) -> InferenceUnavailable:
        return cls(f"{exc} Try again in about {exc.retry_after} s.", retry_after=exc.retry_after)


class InferenceInvalid(InferenceRefused, Invalid, ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, errors={param: [message]} if param else None, param=param)


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str  # the public id it was called by: "base:<name>", "tuna-job-<n>", "ft:..." or "ft:...:ckpt-step-<n>"
    base_model: str
    job: TrainingJob | None
    checkpoint: Checkpoint | None = None  # a kept checkpoint of the job, served instead of its final adapter

    @property
    def adapter(self) -> engines.AdapterChoice | None:
        """The weights on top of the base: the job's final adapter, or one of its kept checkpoints."""
        if self.job is None:
            return None
        if self.checkpoint is not None:
            return engines.AdapterChoice(f"job-{self.job.pk}-step-{self.checkpoint.step}", self.checkpoint.path, checkpoint=True)
        return engines.AdapterChoice(f"job-{self.job.pk}", self.job.adapter_dir)

    @property
    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter else None


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str


FT_NAME = re.compile(r"^ft:.+:ftjob-(?P<pk>[0-9]{1,18})(?::ckpt-step-(?P<step>[0-9]{1,18}))?$")


def kept_checkpoints(job: TrainingJob) -> list[Checkpoint]:
    """The job's kept checkpoints, each a PEFT adapter directory."""
    return [Checkpoint(kept.step, str(kept.path)) for kept in training_selectors.job_checkpoints(job)]


def resolve_model(user, model_id: str | int) -> ResolvedModel:
    """Accept a job id (int or "12"), "tuna-job-12", "ft:<base>:<user>:<suffix>:ftjob-12" (and that name with
    ":ckpt-step-<n>", a kept checkpoint of the job), "base:<name>" or a bare catalog name."""
    raw = str(model_id).strip()
    if raw.startswith(BASE_PREFIX) or raw in get_catalog():
        name = raw.removeprefix(BASE_PREFIX)
        try:
            spec = get_base_model_spec(name)
        except UnknownBaseModel:
            raise ModelNotFound(f"The model {raw!r} does not exist.") from None
        return ResolvedModel(f"{BASE_PREFIX}{spec.name}", spec.name, None)
    if raw.startswith(FT_PREFIX):
        return _resolve_fine_tuned(user, raw)
    number = raw.removeprefix(JOB_PREFIX)
    # ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "١٢" (which it reads as 12).
    is_id = number.isascii() and number.isdigit() and len(number) <= MAX_JOB_ID_DIGITS
    job = TrainingJob.objects.filter(pk=int(number), owner=user).first() if is_id else None
    if job is None:
        raise ModelNotFound(f"The model {raw!r} does not exist. {NAMES}")
    _check_ready(job, job.model_id)
    return ResolvedModel(job.model_id, job.base_model, job)


def _resolve_fine_tuned(user, raw: str) -> ResolvedModel:
    match = FT_NAME.match(raw)
    job = TrainingJob.objects.filter(pk=int(match["pk"]), owner=user).select_related("owner").first() if match else None
    name = job.fine_tuned_model if job is not None else None
    if job is None or raw.removesuffix(f":ckpt-step-{match['step']}" if match["step"] else "") != name:
        raise ModelNotFound(f"The model {raw!r} does not exist. {NAMES}")
    if match["step"] is None:
        _check_ready(job, name)
        return ResolvedModel(name, job.base_model, job)
    step = int(match["step"])
    checkpoint = next((c for c in kept_checkpoints(job) if c.step == step), None)
    if checkpoint is None:
        raise ModelNotFound(f"The model {raw!r} does not exist: {name} has no kept checkpoint at step {step}.")
    return ResolvedModel(raw, job.base_model, job, checkpoint)


def _check_ready(job: TrainingJob, name: str) -> None:
    if job.status != TrainingJob.Status.COMPLETED or not job.adapter_dir:
        raise ModelNotReady(f"The model {name} is not ready: its training job is {job.get_status_display().lower()}.")


def completed_models_for(user) -> list[TrainingJob]:
    return list(TrainingJob.objects.filter(owner=user, status=TrainingJob.Status.COMPLETED).select_related("dataset", "owner"))


def cost_for(compute_ms: float) -> float:
    """A request's compute time (its share of its batch, never its queue wait) at the configured hourly price."""
    return cost_usd(compute_ms / 1000)


def check_params(*, max_tokens, temperature=0.0, top_p=1.0, seed=None) -> None:
    limit = settings.TUNA_MAX_TOKENS_LIMIT
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise InferenceInvalid(f"max_tokens must be a whole number from 1 to {limit}; got {max_tokens!r}.", "max_tokens")
    if not 0 <= temperature <= 2:
        raise InferenceInvalid(f"temperature must be between 0 and 2; got {temperature!r}.", "temperature")
    if not 0 < top_p <= 1:
        raise InferenceInvalid(f"top_p must be greater than 0 and at most 1; got {top_p!r}.", "top_p")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not MIN_SEED <= seed <= MAX_SEED):
        raise InferenceInvalid(f"seed must be a whole number from {MIN_SEED} to {MAX_SEED} (64 bits); got {seed!r}.", "seed")


@dataclass
class Call:
    """A checked request, ready to run on its engine; ``result`` is set once it ended (or was closed)."""

    user: object
    model: ResolvedModel
    request: object  # the engine's own request (Engine.prepare)
    endpoint: str
    runner: Engine | None = None  # the engine that answers it
    engine: str = TRANSFORMERS  # its name (Engine.describe), stored with the usage row
    precision: str = ""  # "bf16" / "fp32" on transformers (the deployment's), "gguf" on llama.cpp
    result: Generation | None = None
    chat: object | None = None  # a chat call's request (inference_app.conversation.ChatRequest): how its answer is read
    admission: Ticket | None = None  # a stream's slot, taken by `admit` before its 200 and given back when the stream ends


def check_prompt_size(*, messages: list[Message] | None = None, text: str | None = None) -> None:
    """Refuse a prompt the limits do not allow before anything is rendered or tokenized (each check costs at most one
    pass over the request): more than TUNA_MAX_CHAT_MESSAGES messages, or more text than TUNA_MAX_PROMPT_TOKENS
    tokens could hold at MAX_CHARS_PER_TOKEN characters each. The exact token count is checked once it is rendered."""
    limit = settings.TUNA_MAX_PROMPT_TOKENS
    if messages is not None:
        most = settings.TUNA_MAX_CHAT_MESSAGES
        if len(messages) > most:
            raise InferenceInvalid(
                f"A chat takes at most {most} messages (TUNA_MAX_CHAT_MESSAGES); this one has {len(messages)}.", "messages"
            )
        chars = sum(_message_chars(m) for m in messages)
        tools = getattr(messages, "tools", None)
        chars += len(json.dumps(tools)) if tools else 0
        param = "messages"
    else:
        chars, param = len(text or ""), "prompt"
    if chars > limit * MAX_CHARS_PER_TOKEN:
        raise InferenceInvalid(
            f"The prompt holds {chars:,} characters; this server takes at most {limit} prompt tokens (TUNA_MAX_PROMPT_TOKENS), "
            f"and text over {limit * MAX_CHARS_PER_TOKEN:,} characters ({MAX_CHARS_PER_TOKEN} per token) is refused before "
            "it is read. Send a shorter prompt.",
            param,
        )


def _message_chars(message: Message) -> int:
    content = message.get("content")
    size = len(content) if isinstance(content, str) else len(json.dumps(content)) if content else 0
    calls = message.get("tool_calls")
    return size + (len(json.dumps(calls)) if calls else 0)


def prepare_call(
    *,
    user,
    model: ResolvedModel,
    endpoint: str,
    messages: list[Message] | None = None,  # a tuna_llm.prompting.Conversation carries its tools
    text: str | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | tuple[str, ...] = (),
) -> Call:
    """Check the prompt's size (before the engine is even chosen), choose the engine, render the prompt (chat
    template for messages, raw for text) and check its tokens fit TUNA_MAX_PROMPT_TOKENS and the context."""

    check_prompt_size(messages=messages, text=text if messages is None else None)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, settings.TUNA_MAX_TOKENS_LIMIT)
    check_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if temperature < MIN_SAMPLING_TEMPERATURE:
        # Sampling this cold is greedy decoding; dividing the logits by it would overflow to inf/nan.
        temperature = 0.0
    try:
        chosen = engines.engine_for(base_model=model.base_model, job=model.job, adapter=model.adapter)
    except engines.NotServable as exc:
        raise ModelNotReady(str(exc)) from None
    except EngineUnavailable as exc:  # e.g. a llama-server that did not start in time: 503 with Retry-After
        raise InferenceUnavailable.of(exc) from None
    spec = CallSpec(
        messages=messages,
        text=text if messages is None else None,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=tuple(stop),
        adapter=chosen.adapter,
        max_prompt_tokens=settings.TUNA_MAX_PROMPT_TOKENS,
    )
    try:
        request = chosen.engine.prepare(spec)
    except EngineUnavailable as exc:  # the engine counts the prompt's tokens, and could not
        raise InferenceUnavailable.of(exc) from None
    except RequestInvalid as exc:
        raise InferenceInvalid(str(exc), exc.param) from None
    except ChatTemplateRefused as exc:  # the model's own rule (e.g. roles must alternate): the request's to fix
        raise InferenceInvalid(str(exc), "messages") from None
    except ToolsUnsupported as exc:  # tool content this model's chat cannot render: refused, never a garbled prompt
        raise InferenceInvalid(str(exc), "tools" if getattr(messages, "tools", None) else "messages") from None
    info = chosen.engine.describe()
    return Call(
        user=user, model=model, request=request, endpoint=endpoint, runner=chosen.engine, engine=info.name, precision=info.precision
    )


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
    result: Generation
    cost_usd: float
    engine: str


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
    # Together: on transformers base and fine-tune share one batch (neither waits for the other, each is
    # billed its share); on llama.cpp they run one after the other, each billed its own decoding time.
    results = run_calls(calls)
    return [
        PlaygroundAnswer(label, call.model.model_id, result, cost_for(result.compute_ms), call.engine)
        for (label, _), call, result in zip(models, calls, results, strict=True)
    ]


def _runner(call: Call) -> Engine:
    """The engine that answers the call (chosen when it was prepared)."""
    return call.runner


def run_call(call: Call):
    return run_calls([call])[0]


class InferenceTooMany(InferenceRefused, TooManyAtOnce, RuntimeError):
    """One user already has TUNA_MAX_INFERENCE_PER_USER calls waiting for (or in) generation in this process."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)


class _Admissions:
    """Calls of this process waiting for (or in) generation, streams included. Each holds a server thread, so
    beyond TUNA_MAX_INFERENCE_QUEUE a call is refused at once (503 with Retry-After) instead of queueing: the
    queue cannot grow without bound, and threads stay free for every other page. One user holds at most
    TUNA_MAX_INFERENCE_PER_USER of them (429 beyond), so the rest of the queue stays for the others."""

    def __init__(self) -> None:
        self.slots = Slots()

    @property
    def count(self) -> int:
        return self.slots.total

    @contextmanager
    def admitted(self, engine, rows: int, user=None) -> Iterator[None]:
        """`rows` calls of `user` (None: no user's share, e.g. the server's own calls) admitted while inside."""
        ticket = self.take(engine, rows, user)
        try:
            yield
        finally:
            ticket.release()

    def take(self, engine, rows: int, user=None) -> Ticket:
        """Slots for `rows` calls of `user`, held until the ticket is released (or dropped); refused at once."""
        limit, per_user = settings.TUNA_MAX_INFERENCE_QUEUE, settings.TUNA_MAX_INFERENCE_PER_USER
        key = getattr(user, "pk", None)
        refusal = self.slots.take(key, rows, per_key=per_user if key is not None else limit, total=limit)
        if refusal is not None:
            retry = max(1, math.ceil(engine.wait_estimate_s(rows)))
            if refusal.scope == "user":
                raise InferenceTooMany(
                    f"You already have {refusal.held} calls waiting for generation and the limit is {per_user} per user "
                    f"(TUNA_MAX_INFERENCE_PER_USER). Let one finish (or close a stream), then try again in about {retry} s.",
                    retry_after=retry,
                )
            raise InferenceBusy(
                f"The model is busy: {refusal.held} calls are waiting for generation and the limit is {limit} "
                f"(TUNA_MAX_INFERENCE_QUEUE). Try again in about {retry} s.",
                retry_after=retry,
            )
        return Ticket(self.slots, key, rows)


admissions = _Admissions()


def admit(call: Call) -> None:
    """Take a stream's slot now, before its 200 goes out (refused: InferenceBusy / InferenceTooMany, logged); the
    stream gives it back when it ends or is closed (or, never started, when the call is dropped)."""
    try:
        call.admission = admissions.take(_runner(call), 1, call.user)
    except InferenceRefused as exc:
        log_refused(call, exc)
        raise


def run_calls(calls: list[Call]) -> list[Generation]:
    """Queue every call before waiting for any, so calls on one engine share a batch (and its time) where the
    engine batches; llama.cpp's decode one after another meanwhile."""
    by_runner: dict[Engine, list[Call]] = {}
    for call in calls:
        by_runner.setdefault(_runner(call), []).append(call)
    with _refusals_logged_for(calls), admissions.admitted(next(iter(by_runner)), len(calls), calls[0].user):
        return _run_admitted(calls, by_runner)


@contextmanager
def _refusals_logged_for(calls: list[Call]) -> Iterator[None]:
    try:
        yield
    except (InferenceBusy, InferenceTooMany) as exc:
        for call in calls:
            _log_error(call, exc)
        raise


def _run_admitted(calls: list[Call], by_runner: dict) -> list[Generation]:
    handles: dict[int, Handle] = {}
    for runner, group in by_runner.items():
        for call, handle in zip(group, runner.submit_all([call.request for call in group]), strict=True):
            handles[id(call)] = handle
    failure = None
    for call in calls:
        try:
            call.result = result_of(handles[id(call)])
        except Exception as exc:
            _log_error(call, exc)
            failure = failure or exc
        else:
            _log(call, call.result)
    if isinstance(failure, EngineUnavailable):  # 503 with Retry-After, the engine's message
        raise InferenceUnavailable.of(failure) from None
    if failure is not None:
        raise failure
    return [call.result for call in calls]


def stream_call(call: Call) -> Iterator[str]:
    """Text pieces as they are generated; the usage is logged when the stream ends, or when it is closed
    early (the client went away): its generation is then stopped and logged with finish_reason "cancelled"."""
    runner = _runner(call)
    try:
        with _stream_slot(call, runner):
            yield from _pieces(call, runner)
    except GeneratorExit:
        if call.result is not None:
            _log(call, call.result)
        raise
    except Exception as exc:
        _log_error(call, exc)
        raise
    _log(call, call.result)


@contextmanager
def _stream_slot(call: Call, runner: Engine) -> Iterator[None]:
    """The slot `admit` took for the stream, or one taken now."""
    ticket, call.admission = call.admission, None
    ticket = ticket or admissions.take(runner, 1, call.user)
    try:
        yield
    finally:
        ticket.release()


def _pieces(call: Call, runner: Engine) -> Iterator[str]:
    """The call's text pieces from its engine; ``call.result`` is set when they end or are closed (closed early,
    decoding stops at the next token: finish_reason "cancelled")."""
    handle = runner.submit(call.request)
    try:
        yield from runner.stream(handle)
    finally:
        call.result = handle.result


def log_refused(call: Call, exc: Exception) -> None:
    """A prepared call refused before generation (the model was busy)."""
    _log_error(call, exc)


def log_cancelled(call: Call) -> None:
    """A stream closed before its request was queued: nothing was generated, and the call is still logged."""
    UsageLog.objects.create(
        user=call.user,
        model_id=call.model.model_id[:MODEL_ID_LENGTH],
        endpoint=call.endpoint,
        engine=call.engine,
        finish_reason="cancelled",
    )


def _log(call: Call, result) -> None:
    UsageLog.objects.create(
        user=call.user,
        model_id=call.model.model_id[:MODEL_ID_LENGTH],
        endpoint=call.endpoint,
        engine=call.engine,
        precision=call.precision,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        latency_ms=result.latency_ms,
        queue_ms=result.queue_ms,
        compute_ms=result.compute_ms,
        cost_usd=cost_for(result.compute_ms),
        finish_reason=result.finish_reason,
    )


def _log_error(call: Call, exc: Exception) -> None:
    UsageLog.objects.create(
        user=call.user,
        model_id=call.model.model_id[:MODEL_ID_LENGTH],
        endpoint=call.endpoint,
        engine=call.engine,
        status=UsageLog.Status.ERROR,
        error=_storable(str(exc))[:500],
    )


def log_rejected(*, user, model_id: str | int, endpoint: str, error: str) -> None:
    """Requests refused before generation are logged too (with their reason)."""
    UsageLog.objects.create(
        user=user,
        model_id=_storable(str(model_id))[:MODEL_ID_LENGTH],
        endpoint=endpoint,
        status=UsageLog.Status.ERROR,
        error=_storable(error)[:500],
    )


def _storable(text: str) -> str:
    """Text any database column takes: NUL (PostgreSQL refuses it) and lone surrogates (no encoding has
    them) written as escapes. A refused request is logged with whatever the client sent."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


@contextmanager
def _refusals_logged(*, user, model_id: str | int, endpoint: str) -> Iterator[None]:
    try:
        yield
    except InferenceRefused as exc:
        log_rejected(user=user, model_id=model_id, endpoint=endpoint, error=str(exc))
        raise
