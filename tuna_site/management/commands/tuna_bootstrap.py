"""The first admin, made once: a random name (or TUNA_ADMIN_USER), a password and a first API key.

The secrets never reach a log: they go to an owner-only file in the data directory, whose path is printed;
they are also shown when the command's output is an interactive terminal (`make run` in a shell), never when
it is a container's log or a pipe.
"""

import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from tuna_core.tokens import api_token_create

CREDENTIALS_FILE = "first-admin.txt"


def _write_owner_only(path: Path, text: str) -> None:
    """Writes `text` to `path` readable by this account only (0600 from its creation, replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o600)  # whatever the umask did
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class Command(BaseCommand):
    help = (
        "Create the first admin if there is none: a random user name (or TUNA_ADMIN_USER), a password (or "
        "TUNA_ADMIN_PASSWORD) and an API key, written to an owner-only file in the data directory."
    )

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("An admin exists; leaving it alone.")
            return
        username = os.environ.get("TUNA_ADMIN_USER", "").strip() or f"admin-{secrets.token_hex(4)}"
        chosen_password = os.environ.get("TUNA_ADMIN_PASSWORD", "")
        password = chosen_password or secrets.token_urlsafe(16)
        path = Path(settings.TUNA_DATA_DIR) / CREDENTIALS_FILE
        with transaction.atomic():  # no file: no admin either (the next start tries again)
            user = User.objects.create_superuser(username=username, email="", password=password)
            _, key = api_token_create(user=user, name="First key (tuna_bootstrap)")
            lines = [
                "LLM Tuna's first admin (made by tuna_bootstrap). Keep these somewhere safe, then delete this file.",
                f"user name: {username}",
                f"password:  {'(the one in TUNA_ADMIN_PASSWORD)' if chosen_password else password}",
                f"API key:   {key}",
            ]
            _write_owner_only(path, "\n".join(lines) + "\n")
        self.stdout.write(self.style.SUCCESS(f"Created the first admin, {username}."))
        if self.stdout.isatty():
            self.stdout.write("\n".join(f"  {line}" for line in lines[1:]))
        self.stdout.write(f"Its password and API key are in {path} (readable by this account only); delete it once saved.")
