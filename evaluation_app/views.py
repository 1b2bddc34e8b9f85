from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from evaluation_app.selectors import evaluations_for_user, get_evaluation_for_user


@login_required
@require_GET
def evaluation_list(request: HttpRequest) -> HttpResponse:
    return render(request, "evaluation_app/evaluation_list.html", {"evaluations": evaluations_for_user(request.user)})


@login_required
@require_GET
def evaluation_detail(request: HttpRequest, pk: int) -> HttpResponse:
    evaluation = get_evaluation_for_user(request.user, pk)
    return render(request, "evaluation_app/evaluation_detail.html", {"evaluation": evaluation})
