from django.apps import AppConfig


class TrainingAppConfig(AppConfig):
    name = "training_app"
    verbose_name = "Training"

    def ready(self) -> None:
        from datasets_app.services import dataset_deleting
        from training_app.services import dataset_jobs_delete

        dataset_deleting.connect(dataset_jobs_delete, dispatch_uid="training_app.dataset_jobs_delete")
