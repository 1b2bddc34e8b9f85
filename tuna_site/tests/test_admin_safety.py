"""The admin manages, it does not execute: no Schedule form, no task resubmit, no editing a worker's paths."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone
from django_q.models import Failure, OrmQ, Schedule, Success

from tests.support import job_row
from training_app.models import Export, ThroughputMeasurement, TrainingJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, django_user_model):
    root = django_user_model.objects.create_superuser("root", password="root-pass-123")
    client.force_login(root)
    return client


def test_it_offers_no_schedule_form_to_a_superuser(staff_client):
    assert not admin.site.is_registered(Schedule)
    assert staff_client.get("/admin/django_q/schedule/add/").status_code == 404
    assert staff_client.get("/admin/django_q/schedule/").status_code == 404
    index = staff_client.get(reverse("admin:index")).content.decode()
    assert "/admin/django_q/schedule/" not in index

    # A Schedule posted to where the form was creates nothing: the worker would have called it.
    response = staff_client.post(
        "/admin/django_q/schedule/add/",
        {"func": "subprocess.getoutput", "args": "'touch /tmp/pwned'", "schedule_type": "O", "repeats": "-1"},
    )
    assert response.status_code == 404
    assert Schedule.objects.count() == 0


def test_it_keeps_the_task_history_read_only_without_resubmit(staff_client):
    now = timezone.now()
    failed = Failure.objects.create(
        id="a" * 32, name="tuna-x", func="subprocess.getoutput", args=("id",), success=False, started=now, stopped=now
    )
    changelist = reverse("admin:django_q_failure_changelist")
    page = staff_client.get(changelist)
    assert page.status_code == 200 and "tuna-x" in page.content.decode()
    assert 'name="action"' not in page.content.decode()  # no "Resubmit selected tasks" (nor delete) action

    resubmit = staff_client.post(changelist, {"action": "resubmit_task", "_selected_action": [failed.pk]})
    assert resubmit.status_code in (200, 302)
    assert OrmQ.objects.count() == 0  # nothing queued for the worker
    assert Failure.objects.filter(pk=failed.pk).exists()

    change = reverse("admin:django_q_failure_change", args=[failed.pk])
    view = staff_client.get(change)
    assert view.status_code == 200 and 'name="_save"' not in view.content.decode()  # a view, not a form
    edited = staff_client.post(change, {"func": "os.system", "name": "changed"})
    assert edited.status_code == 403
    failed.refresh_from_db()
    assert failed.func == "subprocess.getoutput" and failed.name == "tuna-x"
    for model in (Success, Failure, OrmQ):
        assert staff_client.get(reverse(f"admin:django_q_{model._meta.model_name}_add")).status_code == 403


def test_it_ignores_a_post_that_changes_a_jobs_adapter_dir(staff_client, alice, valid_dataset, settings):
    job = job_row(alice, valid_dataset, status="completed", adapter_dir=str(settings.TUNA_DATA_DIR / "adapters" / "1"), worker_pid=4242)
    change = reverse("admin:training_app_trainingjob_change", args=[job.pk])
    form = staff_client.get(change).content.decode()
    assert 'name="adapter_dir"' not in form and 'name="worker_pid"' not in form and 'name="worker_host"' not in form

    response = staff_client.post(
        change,
        {
            "adapter_dir": str(settings.TUNA_DATA_DIR),
            "worker_host": "elsewhere",
            "worker_pid": "1",
            "status": "queued",
            "base_model": "other",
            "config": '{"num_epochs": 99}',
            "owner": str(alice.pk),
            "dataset": str(valid_dataset.pk),
            "_save": "Save",
            # the read-only loss points inline's management form
            "loss_points-TOTAL_FORMS": "0",
            "loss_points-INITIAL_FORMS": "0",
            "losspoint_set-TOTAL_FORMS": "0",
            "losspoint_set-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code in (200, 302)
    job.refresh_from_db()
    assert job.adapter_dir == str(settings.TUNA_DATA_DIR / "adapters" / "1")
    assert job.worker_pid == 4242 and job.worker_host == "" and job.status == "completed"
    assert job.base_model == "smollm2-135m-instruct" and job.config == {}
    # Jobs are made by the services (quota, validation), never from an admin form.
    assert staff_client.get(reverse("admin:training_app_trainingjob_add")).status_code == 403


def test_it_shows_every_worker_owned_field_read_only(staff_client, alice, valid_dataset):
    job = job_row(alice, valid_dataset, status="completed", adapter_dir="/x")
    export = Export.objects.create(owner=alice, training_job=job, formats=["gguf_f16"], files=[{"path": "exports/1/a.gguf"}])
    for model, pk, fields in (
        (TrainingJob, job.pk, ["adapter_dir", "worker_host", "worker_pid", "status", "config", "owner", "dataset"]),
        (Export, export.pk, ["files", "worker_host", "worker_pid", "status", "formats"]),
    ):
        model_admin = admin.site._registry[model]
        request = staff_client.get(reverse(f"admin:training_app_{model._meta.model_name}_change", args=[pk])).wsgi_request
        readonly = model_admin.get_readonly_fields(request, model.objects.get(pk=pk))
        assert set(fields) <= set(readonly), (model, set(fields) - set(readonly))
    # The dataset's stored files cannot be swapped (that would skip validation and the quota); its name can change.
    dataset_admin = admin.site._registry[valid_dataset._meta.model]
    readonly = dataset_admin.get_readonly_fields(None, valid_dataset)
    assert {"file", "eval_file", "size_bytes", "owner"} <= set(readonly) and "name" not in readonly
    page = staff_client.post(reverse("admin:datasets_app_dataset_change", args=[valid_dataset.pk]), {"name": "Renamed", "_save": "Save"})
    assert page.status_code == 302
    valid_dataset.refresh_from_db()
    assert valid_dataset.name == "Renamed"


def test_it_keeps_measured_speeds_read_only(staff_client):
    """Every estimate is computed from these rows: the admin shows them but neither edits nor adds one."""
    row = ThroughputMeasurement.objects.create(base_model="smollm2-135m-instruct", device="cpu", tokens_per_second=900.0, source="bench")
    change = reverse("admin:training_app_throughputmeasurement_change", args=[row.pk])
    form = staff_client.get(change)
    assert form.status_code == 200 and 'name="tokens_per_second"' not in form.content.decode()
    response = staff_client.post(
        change,
        {
            "base_model": "other",
            "device": "cuda",
            "tokens_per_second": "1",
            "source": "typed",
            "measured_at_0": "2020-01-01",
            "measured_at_1": "00:00:00",
            "_save": "Save",
        },
    )
    assert response.status_code in (200, 302, 403)
    row.refresh_from_db()
    assert (row.base_model, row.device, row.tokens_per_second, row.source) == ("smollm2-135m-instruct", "cpu", 900.0, "bench")
    add = reverse("admin:training_app_throughputmeasurement_add")
    assert staff_client.get(add).status_code == 403
    staff_client.post(add, {"base_model": "x", "device": "cpu", "tokens_per_second": "1e9", "source": "typed"})
    assert ThroughputMeasurement.objects.count() == 1
