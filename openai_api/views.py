from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from openai_api import objects
from training_app.selectors import jobs_for_user
from tuna_llm.catalog import get_catalog


@login_required
def coming_from_openai(request: HttpRequest) -> HttpResponse:
    """How a script written for OpenAI's fine-tuning runs here: what maps to what, what is refused and why."""
    latest = jobs_for_user(request.user).filter(status="completed").order_by("-pk").first()
    context = {
        "base_url": request.build_absolute_uri("/v1"),
        "base_models": sorted(get_catalog()),
        "default_model": settings.TUNA_DEFAULT_BASE_MODEL,
        "example_fine_tune": latest.fine_tuned_model if latest else None,
        "statuses": objects.STATUS,
    }
    return render(request, "openai_api/coming_from_openai.html", context)
