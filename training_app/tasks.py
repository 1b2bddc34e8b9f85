"""django-q2 entry points: thin, and they take ids."""

from training_app import services


def training_job_execute(job_id: int) -> None:
    services.training_job_run(job_id=job_id)
