from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from rest_framework.authtoken.models import Token

from datasets_app.models import Dataset
from evaluation_app.models import Evaluation
from training_app.models import TrainingJob


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    user = request.user
    datasets = Dataset.objects.filter(owner=user)
    jobs = TrainingJob.objects.filter(owner=user).select_related("dataset")
    evaluations = Evaluation.objects.filter(owner=user).select_related("training_job")
    context = {
        "counts": {
            "datasets": datasets.count(),
            "valid_datasets": datasets.filter(validation_status=Dataset.Status.VALID).count(),
            "jobs": jobs.count(),
            "completed_jobs": jobs.filter(status=TrainingJob.Status.COMPLETED).count(),
            "evaluations": evaluations.count(),
        },
        "recent_datasets": datasets.order_by("-created_at")[:5],
        "recent_jobs": jobs.order_by("-created_at")[:5],
        "recent_evaluations": evaluations.order_by("-created_at")[:5],
    }
    return render(request, "dashboard.html", context)


@login_required
def account(request: HttpRequest) -> HttpResponse:
    token, _ = Token.objects.get_or_create(user=request.user)
    return render(request, "account.html", {"token": token})
