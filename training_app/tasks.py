"""Tasks queued by versions before fair scheduling took the job id; they now run the fairest queued job."""

from tuna_core.jobs import run_next_job


def training_job_execute(job_id: int | None = None) -> None:
    run_next_job()
