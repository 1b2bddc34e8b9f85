from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods

from inference_app import services
from inference_app.selectors import usage_summary

MAX_PLAYGROUND_TOKENS = 256


@login_required
@require_http_methods(["GET", "POST"])
def playground(request: HttpRequest) -> HttpResponse:
    models = services.completed_models_for(request.user)
    default = models[0].model_id if models else f"{services.BASE_PREFIX}{settings.TUNA_DEFAULT_BASE_MODEL}"
    selected = request.POST.get("model") or request.GET.get("model") or default
    prompt = request.POST.get("prompt", "").strip()
    max_tokens = min(MAX_PLAYGROUND_TOKENS, settings.TUNA_MAX_TOKENS_LIMIT)
    context = {
        "models": models,
        "selected": selected,
        "prompt": prompt,
        "api_base": request.build_absolute_uri("/v1"),
        "default_base": settings.TUNA_DEFAULT_BASE_MODEL,
        "max_tokens": max_tokens,
    }
    status = 200
    if request.method == "POST":
        try:
            context["answers"] = services.playground_compare(user=request.user, model_id=selected, prompt=prompt, max_tokens=max_tokens)
        except services.InferenceRefused as exc:
            context["error"], status = str(exc), exc.status
    partial = request.method == "POST" and request.htmx
    template = "inference_app/_playground_result.html" if partial else "inference_app/playground.html"
    return render(request, template, context, status=status)


@login_required
@require_http_methods(["GET"])
def usage(request: HttpRequest) -> HttpResponse:
    return render(request, "inference_app/usage.html", usage_summary(request.user))
