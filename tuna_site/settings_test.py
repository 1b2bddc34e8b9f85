"""Settings for the test suite: the normal settings with DEBUG on (as `make run`), and on SQLite a test
database in a file, so that the worker processes some tests start can open it too."""

import os
import tempfile

os.environ.setdefault("DEBUG", "1")

from tuna_site.settings import *  # noqa: E402,F403
from tuna_site.settings import DATABASES  # noqa: E402

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(tempfile.gettempdir(), f"tuna-test-{os.getpid()}.sqlite3")}

# Users made by the tests hash their passwords quickly (the production hashers still read any other hash).
# Hashing is slow on purpose, and each test makes its users and logs them in anew.
from django.conf import global_settings  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher", *global_settings.PASSWORD_HASHERS]
