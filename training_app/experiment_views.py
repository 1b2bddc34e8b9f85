"""Sweep pages: the "Try several settings" part of the training form, the sweeps list and a sweep's page."""

from __future__ import annotations

import json
import re
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from training_app import experiments, services
from training_app.models import Experiment

GRID_CELL = re.compile(r"grid-(\d{1,2})-(learning_rate|num_epochs|lora_r|lora_layers)")
# Form fields of the sweep part, never settings of a job.
SWEEP_FIELDS = ("csrfmiddlewaretoken", "preview", "sweep", "sweep_name", "early_stopping", "grid_base")


def job_values(post: QueryDict) -> dict[str, str]:
    """The training form's settings, without the sweep's fields."""
    return {k: v for k, v in post.items() if k not in SWEEP_FIELDS and not GRID_CELL.fullmatch(k) and v != ""}


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _posted_rows(post: QueryDict) -> list[dict[str, str]] | None:
    """The grid as typed, one dict of cells per form row (blank rows included); None when the form had no grid."""
    cells: dict[int, dict[str, str]] = {}
    for key, value in post.items():
        match = GRID_CELL.fullmatch(key)
        if match:
            cells.setdefault(int(match[1]), {})[match[2]] = value.strip()
    if not cells:
        return None
    return [cells.get(i, {}) for i in range(max(cells) + 1)]


def _default_rows(dataset, values: dict[str, str]) -> list[dict[str, str]]:
    return [{key: _cell(point[key]) for key in experiments.GRID_KEYS} for point in experiments.default_grid(dataset, values)]


def _grid_rows(dataset, values: dict[str, str], post: QueryDict) -> tuple[list[dict[str, str]], bool]:
    """The grid to show, and whether it was (re)made from the settings: the default grid on a first view, and again after
    a change of the settings above while the grid is still the default one for the previous settings; else as typed."""
    posted = _posted_rows(post)
    if posted is None:
        return _default_rows(dataset, values), True
    filled = [row for row in posted if any(row.values())]
    try:
        before = json.loads(post.get("grid_base", ""))
    except ValueError:
        before = None
    if isinstance(before, dict) and before != values and filled == _default_rows(dataset, before):
        return _default_rows(dataset, values), True
    return posted, False


def posted_grid(post: QueryDict) -> list[dict[str, str]]:
    """The grid for experiment_start: the filled rows, each with its filled cells (an empty cell: the chosen value)."""
    rows = _posted_rows(post) or []
    return [{key: value for key, value in row.items() if value} for row in rows if any(row.values())]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def sweep_context(dataset, values: dict[str, str], post: QueryDict, *, errors: dict | None = None, method: str = "GET") -> dict:
    """What the "Try several settings" part shows: the grid (with each cell's error), the sweep's estimate, its limits."""
    rows, remade = _grid_rows(dataset, values, post)
    filled = [i for i, row in enumerate(rows) if any(row.values())]
    grid = [{key: value for key, value in rows[i].items() if value} for i in filled]
    estimate, problem, grid_errors = None, "", {}
    try:
        estimate = experiments.sweep_estimate(dataset, values, grid)
    except services.ConfigInvalid as exc:
        grid_errors = {name: " ".join(messages) for name, messages in exc.errors.items()}
        problem = (
            "Fix the grid's errors to see the estimate." if any(k.startswith("grid") for k in grid_errors) else "Fix the settings above."
        )
    grid_errors |= {name: " ".join(m) if isinstance(m, list) else m for name, m in (errors or {}).items()}
    row_of = {j: i for j, i in enumerate(filled)}  # grid index -> form row
    by_row: dict[int, dict[str, str]] = {}
    for name, message in grid_errors.items():
        match = re.fullmatch(r"grid\[(\d+)\](?:\.(\w+))?", name)
        if match and int(match[1]) in row_of:
            by_row.setdefault(row_of[int(match[1])], {})[match[2] or ""] = message
    shown = max(settings.TUNA_MAX_SWEEP_RUNS, len(rows))
    base_model = values.get("base_model") or settings.TUNA_DEFAULT_BASE_MODEL
    try:
        choices = experiments.layer_choices(base_model)
    except Exception:  # an unknown base model: the settings above say so
        choices = {}
    table = []
    for i in range(shown):
        row = rows[i] if i < len(rows) else {}
        cell_errors = by_row.get(i, {})
        table.append(
            {
                "index": i,
                "cells": [{"name": key, "value": row.get(key, ""), "error": cell_errors.get(key)} for key in experiments.GRID_KEYS],
                "error": cell_errors.get(""),
            }
        )
    return {
        "sweep": {
            "rows": table,
            "remade": remade,
            "grid_base": json.dumps(values, sort_keys=True),
            "layer_choices": choices,
            "estimate": estimate,
            "duration": _duration(estimate["seconds"]) if estimate and estimate.get("available") else "",
            "problem": problem,
            "error": (errors or {}).get("sweep") or (errors or {}).get("grid") or (errors or {}).get("eval_examples"),
            "open": method == "POST" and bool(post.get("sweep") or errors),
            "early_stopping": method == "GET" or bool(post.get("early_stopping")),
            "name": post.get("sweep_name", ""),
            "max_runs": settings.TUNA_MAX_SWEEP_RUNS,
            "max_hours": settings.TUNA_MAX_SWEEP_HOURS,
            "grace": experiments.EARLY_STOP_GRACE,
            "margin": experiments.EARLY_STOP_MARGIN,
        }
    }


def sweep_start(request: HttpRequest, dataset, values: dict[str, str]) -> Experiment:
    return experiments.experiment_start(
        owner=request.user,
        dataset=dataset,
        config_data=values,
        grid=posted_grid(request.POST),
        early_stopping=bool(request.POST.get("early_stopping")),
        name=request.POST.get("sweep_name", "").strip(),
    )


# -- pages ------------------------------------------------------------------------------------
@login_required
@require_GET
def experiment_list(request: HttpRequest) -> HttpResponse:
    return render(request, "training_app/experiment_list.html", {"experiments": experiments.experiments_for_user(request.user)})


def _detail_context(experiment: Experiment) -> dict:
    winner = experiment.winner
    return {
        "experiment": experiment,
        "rows": experiments.experiment_runs(experiment),
        "winner": winner,
        "winner_evaluation": winner.evaluations.filter(baseline_job__isnull=True).order_by("-created_at", "-id").first()
        if winner
        else None,
        "grace": experiments.EARLY_STOP_GRACE,
        "margin": experiments.EARLY_STOP_MARGIN,
        "min_completed": experiments.EARLY_STOP_MIN_COMPLETED,
    }


@login_required
@require_GET
def experiment_detail(request: HttpRequest, pk: int) -> HttpResponse:
    experiment = experiments.get_experiment_for_user(request.user, pk)
    experiment = experiments.experiment_settle(experiment=experiment)  # a run that ended without its worker telling
    experiment = experiments.get_experiment_for_user(request.user, pk)
    context = _detail_context(experiment)
    if request.htmx:
        return render(request, "training_app/_sweep_runs.html", context)
    return render(request, "training_app/experiment_detail.html", context)


@login_required
@require_POST
def experiment_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    experiment = experiments.get_experiment_for_user(request.user, pk)
    try:
        experiments.experiment_cancel(experiment=experiment)
    except experiments.SweepConflict as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Cancelling sweep #{pk}: its queued runs are cancelled, a training one stops after its current step.")
    return redirect(experiment)
