from django.apps import AppConfig
from django.conf import settings

from tuna_llm import settings as llm_settings


class TunaSiteConfig(AppConfig):
    name = "tuna_site"
    verbose_name = "LLM Tuna"

    def ready(self) -> None:
        # The model layer reads the live Django settings through this provider (it never imports Django).
        llm_settings.configure(model_layer_settings)
        # Owner-only data: the settings set an owner-only umask (files 0600, folders 0700: the SQLite file and its
        # WAL, uploads, adapters, checkpoints, exports); what an older version left open in what LLM Tuna makes
        # there (tuna_site.checks.own_paths, no links followed) is closed now, and a path that cannot be closed is
        # a system check error (tuna_site.checks).
        from tuna_site import checks

        checks.data_dir_close()


def model_layer_settings() -> llm_settings.LlmSettings:
    return llm_settings.LlmSettings(
        base_models=dict(settings.TUNA_BASE_MODELS),
        default_base_model=settings.TUNA_DEFAULT_BASE_MODEL,
        model_cache_dir=settings.TUNA_MODEL_CACHE_DIR,
        adapter_cache_size=settings.TUNA_ADAPTER_CACHE_SIZE,
        hf_token=settings.HF_TOKEN,
        precision=settings.TUNA_PRECISION,
        pack_weights=settings.TUNA_PACK_WEIGHTS,
        llama_server_bin=settings.TUNA_LLAMA_SERVER_BIN,
        llama_server_parallel=settings.TUNA_LLAMA_SERVER_PARALLEL,
    )
