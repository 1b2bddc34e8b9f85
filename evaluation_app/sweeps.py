"""A sweep's winner is evaluated against the base model as soon as it is picked (training_app.experiments sends
experiment_finished), on the dataset's scoring set: the same held-out examples as every other run of the dataset."""

from __future__ import annotations

import logging

from evaluation_app.runs import scoring_start
from tuna_core.errors import UserError

logger = logging.getLogger("tuna.evaluation")


def evaluate_winner(sender, *, experiment, **kwargs) -> None:
    """experiment_finished receiver: queue the winner's evaluation against the base model (none without a winner).

    A refusal (e.g. the owner is at TUNA_MAX_ACTIVE_JOBS_PER_USER) is logged, not raised: the sweep's page then offers
    the evaluation by hand."""
    if experiment.winner_id is None:
        return
    try:
        evaluation, created = scoring_start(owner=experiment.owner, job=experiment.winner)
    except UserError as exc:
        logger.warning("Sweep %s: the winner, job #%s, was not evaluated: %s", experiment.pk, experiment.winner_id, exc.message)
        return
    logger.info(
        "Sweep %s: the winner, job #%s, %s evaluation #%s against the base model",
        experiment.pk,
        experiment.winner_id,
        "is queued for" if created else "already has",
        evaluation.pk,
    )
