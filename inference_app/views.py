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
    selected = request.POST.get("model") or request.GET.get("model") or (models[0].model_id if models else "")
    prompt = request.POST.get("prompt", "").strip()
    context = {
        "models": models,
        "selected": selected,
        "prompt": prompt,
        "token": Token.objects.get_or_create(user=request.user)[0],
        "api_base": request.build_absolute_uri("/v1"),
        "default_base": settings.TUNA_DEFAULT_BASE_MODEL,
    }
    if request.method == "POST":
        context.update(_compare(request, selected, prompt))
        if request.htmx:
            return render(request, "inference_app/_playground_result.html", context, status=context.get("status", 200))
    return render(request, "inference_app/playground.html", context, status=context.get("status", 200))


def _compare(request: HttpRequest, selected: str, prompt: str) -> dict:
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
    answers = [
        {
            "label": label,
            "model_id": m.model_id,
            "result": services.inference_generate(
                user=request.user, model=m, messages=messages, endpoint="playground", max_tokens=MAX_PLAYGROUND_TOKENS
            ),
        }
        for label, m in results
    ]
    return {"answers": answers}


@login_required
@require_http_methods(["GET"])
def usage(request: HttpRequest) -> HttpResponse:
    from inference_app.selectors import usage_summary

    return render(request, "inference_app/usage.html", usage_summary(request.user))
