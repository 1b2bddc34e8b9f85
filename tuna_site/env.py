"""Tiny helpers that read settings from the environment and fail loudly on a bad value."""

import json
import os
import secrets
import tempfile
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

# Group and others get no bit of what this process creates: the data directory is its owner's only.
OWNER_ONLY_UMASK = 0o077

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, got {raw!r}")


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def env_rate(name: str, default: str) -> str | None:
    """A rate like ``300/min`` (per second, minute, hour or day); ``off`` turns the limit off (None)."""
    raw = os.environ.get(name, default).strip()
    if raw.lower() in ("off", "none", "0", ""):
        return None
    count, sep, period = raw.partition("/")
    if not sep or not count.isdigit() or int(count) < 1 or period[:1] not in ("s", "m", "h", "d"):
        raise ImproperlyConfigured(f"{name} must look like 300/min (a count per second, minute, hour or day) or off, got {raw!r}")
    return raw


def env_json(name: str, default: dict) -> dict:
    """A JSON object (e.g. TUNA_REMOTE_ENGINES); a value that is not one fails with what is wrong."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def parse_base_models(raw: str) -> dict[str, str]:
    """Parse ``name=source,name=source`` where source is a Hugging Face id or a local directory."""
    catalog: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, source = item.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise ImproperlyConfigured(f"TUNA_BASE_MODELS entries look like name=huggingface/id or name=/local/dir, got {item!r}")
        catalog[name] = source
    return catalog


def owner_only_umask() -> None:
    """Files and folders this process (and every process it starts) creates from now on are 0600 / 0700."""
    os.umask(OWNER_ONLY_UMASK)


def installation_secret_key(path: Path) -> str:
    """The key kept at `path`, made (random, owner-only) the first time."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(50)
    # Written whole to a private file, then linked into place: a process starting beside this one
    # either finds no key yet or the whole key, and the first link wins.
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(key + "\n")
        os.link(partial, path)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    finally:
        os.unlink(partial)
    return key
