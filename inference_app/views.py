from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods
from rest_framework.authtoken.models import Token

from inference_app import services
from inference_app.prompting import prompt_messages

MAX_PLAYGROUND_TOKENS = 256


@login_required
@require_http_methods(["GET", "POST"])
def playground(request: HttpRequest) -> HttpResponse:
    models = services.completed_models_for(request.user)
    default = models[0].model_id if models else f"base:{settings.TUNA_DEFAULT_BASE_MODEL}"
    selected = request.POST.get("model") or request.GET.get("model") or default
    prompt = request.POST.get("prompt", "").strip()
    context = {
        "models": models,
        "selected": selected,
        "prompt": prompt,
        "token": Token.objects.get_or_create(user=request.user)[0],
        "api_base": request.build_absolute_uri("/v1"),
        "default_base": settings.TUNA_DEFAULT_BASE_MODEL,
        "max_tokens": min(MAX_PLAYGROUND_TOKENS, settings.TUNA_MAX_TOKENS_LIMIT),
    }
    if request.method == "POST":
        context.update(_compare(request, selected, prompt, context["max_tokens"]))
        if request.htmx:
            return render(request, "inference_app/_playground_result.html", context, status=context.get("status", 200))
    return render(request, "inference_app/playground.html", context, status=context.get("status", 200))


def _compare(request: HttpRequest, selected: str, prompt: str, max_tokens: int) -> dict:
    if not prompt:
        return {"error": "Type a prompt first.", "status": 400}
    try:
        model = services.resolve_model(request.user, selected)
    except (services.ModelNotFound, services.ModelNotReady) as exc:
        return {"error": str(exc), "status": 404 if isinstance(exc, services.ModelNotFound) else 409}
    messages = prompt_messages(prompt)
    base = services.resolve_model(request.user, f"base:{model.base_model}")
    results = [("Base model", base)]
    if model.job is not None:
        results.append((f"Fine-tuned ({model.model_id})", model))
    try:
        # Check every call before running any, so a prompt the model cannot take costs nothing.
        calls = [
            (
                label,
                services.prepare_call(
                    user=request.user,
                    model=m,
                    endpoint="playground",
                    messages=messages,
                    max_tokens=max_tokens,
                ),
            )
            for label, m in results
        ]
    except (services.InferenceInvalid, services.ModelNotReady) as exc:
        services.log_rejected(user=request.user, model_id=model.model_id, endpoint="playground", error=str(exc))
        return {"error": str(exc), "status": 400 if isinstance(exc, services.InferenceInvalid) else 409}
    # Together, so base and fine-tune share one batch: neither waits for the other, each is billed its share.
    results = services.run_calls([call for _, call in calls])
    return {
        "answers": [
            {"label": label, "model_id": call.model.model_id, "result": result, "cost_usd": services.cost_for(result.compute_ms)}
            for (label, call), result in zip(calls, results, strict=True)
        ]
    }


@login_required
@require_http_methods(["GET"])
def usage(request: HttpRequest) -> HttpResponse:
    from inference_app.selectors import usage_summary

    return render(request, "inference_app/usage.html", usage_summary(request.user))
