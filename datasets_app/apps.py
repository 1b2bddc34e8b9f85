from django.apps import AppConfig


class DatasetsAppConfig(AppConfig):
    name = "datasets_app"
    verbose_name = "Datasets"

    def ready(self) -> None:
        from django.db.models.signals import post_delete

        from datasets_app.models import Dataset
        from datasets_app.selectors import dataset_storage_bytes
        from datasets_app.services import dataset_files_remove
        from tuna_core.quotas import register_storage

        register_storage("datasets", lambda owner: {"datasets": dataset_storage_bytes(owner)})
        # However a row goes (a page, the admin, a user deleted with everything they own), its files go once committed.
        post_delete.connect(dataset_files_remove, sender=Dataset, dispatch_uid="datasets_app.dataset_files_remove")
