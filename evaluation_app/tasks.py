"""Tasks queued by versions before fair scheduling took the evaluation id; they now run the fairest queued job."""

from tuna_core.jobs import run_next_job


def evaluation_execute(evaluation_id: int | None = None) -> None:
    run_next_job()
