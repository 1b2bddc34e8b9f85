from django.apps import AppConfig


class TrainingAppConfig(AppConfig):
    name = "training_app"
    verbose_name = "Training"

    def ready(self) -> None:
        from datasets_app.services import dataset_deleting
        from training_app.services import dataset_jobs_delete

        dataset_deleting.connect(dataset_jobs_delete, dispatch_uid="training_app.dataset_jobs_delete")

        from django.db.models.signals import post_delete

        from training_app.models import TrainingJob
        from training_app.storage import job_files_remove, jobs_storage
        from tuna_core.quotas import register_storage

        register_storage("training", jobs_storage)  # checkpoints, adapters and exports count against the storage quota
        post_delete.connect(job_files_remove, sender=TrainingJob, dispatch_uid="training_app.job_files_remove")
