from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from datasets_app.selectors import datasets_for_user
from evaluation_app.selectors import evaluations_for_user
from training_app.selectors import jobs_for_user
from training_app.storage import storage_use
from tuna_site.throttles import RateLimitedAuthenticationForm


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """Every app's recent items, each read through the selectors the app owns."""
    user = request.user
    datasets = datasets_for_user(user)
    jobs = jobs_for_user(user)
    evaluations = evaluations_for_user(user)
    context = {
        "counts": {
            "datasets": datasets.count(),
            "valid_datasets": datasets.filter(validation_status="valid").count(),
            "jobs": jobs.count(),
            "completed_jobs": jobs.filter(status="completed").count(),
            "evaluations": evaluations.count(),
        },
        "recent_datasets": datasets.order_by("-created_at")[:5],
        "recent_jobs": jobs.order_by("-created_at")[:5],
        "recent_evaluations": evaluations.order_by("-created_at")[:5],
        "storage": storage_use(user),
    }
    return render(request, "dashboard.html", context)


class LoginView(auth_views.LoginView):
    """Django's log-in page, refusing further tries (429, with Retry-After) after too many failures."""

    authentication_form = RateLimitedAuthenticationForm
    redirect_authenticated_user = True

    def form_invalid(self, form: RateLimitedAuthenticationForm) -> HttpResponse:
        response = super().form_invalid(form)
        if form.retry_after:
            response.status_code = 429
            response["Retry-After"] = str(form.retry_after)
        return response
