from django.apps import AppConfig


class InferenceAppConfig(AppConfig):
    name = "inference_app"
    verbose_name = "Inference"

    def ready(self) -> None:
        from inference_app import remote_engines  # noqa: F401 - registers the TUNA_REMOTE_ENGINES system check
