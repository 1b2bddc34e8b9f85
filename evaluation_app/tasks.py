"""django-q2 entry points: thin, and they take ids."""

from evaluation_app import services


def evaluation_execute(evaluation_id: int) -> None:
    services.evaluation_run(evaluation_id=evaluation_id)
