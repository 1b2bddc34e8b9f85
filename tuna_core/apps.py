from django.apps import AppConfig


class TunaCoreConfig(AppConfig):
    """The ground every app stands on: job lifecycle, supervision, quotas, parsing, errors, costs."""

    name = "tuna_core"
    verbose_name = "LLM Tuna core"
