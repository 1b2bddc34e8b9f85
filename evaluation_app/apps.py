from django.apps import AppConfig


class EvaluationAppConfig(AppConfig):
    name = "evaluation_app"
    verbose_name = "Evaluation"

    def ready(self) -> None:
        from evaluation_app.preference import evaluate_against_parent
        from evaluation_app.sweeps import evaluate_winner
        from training_app.experiments import experiment_finished
        from training_app.services import job_completed

        job_completed.connect(evaluate_against_parent, dispatch_uid="evaluation_app.evaluate_against_parent")
        experiment_finished.connect(evaluate_winner, dispatch_uid="evaluation_app.evaluate_winner")
