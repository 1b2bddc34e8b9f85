"""The data directory is owner-only: its folders 0700, its files 0600.

It holds the database (password hashes, API key digests), the secret key, every user's datasets and models.
Everything this site's processes create there is made owner-only by the umask the settings set
(`tuna_site.env.owner_only_umask`); what an older version (or a copy, or a restore) left open is closed at start-up by `data_dir_close`. A path this process
cannot close (another user's file) is a system check error: `manage.py` commands, the worker and runserver
refuse to start until the operator fixes it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from django.conf import settings
from django.core import checks

logger = logging.getLogger("tuna.security")

DIR_MODE = 0o700


def _open_entries(root: Path):
    """(path, its stat) of the root and of every folder and plain file below it that others could read or enter."""
    entries = [(root, True)]
    for folder, dirs, files in os.walk(root, followlinks=False):
        entries.extend((Path(folder, name), True) for name in dirs)
        entries.extend((Path(folder, name), False) for name in files)
    for path, _ in entries:
        try:
            info = path.lstat()
        except FileNotFoundError:  # removed while we looked (a temporary file)
            continue
        if stat.S_ISLNK(info.st_mode) or not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            continue
        if info.st_mode & 0o077:
            yield path, info


def data_dir_close(root: Path | None = None) -> tuple[list[Path], list[str]]:
    """Make `root` (the data directory) and everything in it owner-only. Returns (paths closed, problems left)."""
    root = Path(root or settings.TUNA_DATA_DIR)
    closed, problems = [], []
    if not root.exists():
        return closed, problems
    for path, info in _open_entries(root):
        # Group and others lose every bit; the owner keeps its own (a folder: rwx, so the site can still use it).
        mode = stat.S_IMODE(info.st_mode) & 0o700 | (DIR_MODE if stat.S_ISDIR(info.st_mode) else 0)
        try:
            os.chmod(path, mode)
            closed.append(path)
        except FileNotFoundError:
            continue
        except OSError as exc:  # another user's file (EPERM), a read-only mount (EROFS)
            problems.append(
                f"{path} is mode {stat.S_IMODE(info.st_mode):o}, owned by uid {info.st_uid} (this process is uid {os.getuid()}): "
                f"{exc.strerror or exc}"
            )
    if closed:
        logger.warning("Closed %d path(s) in the data directory %s to their owner (0700 folders, 0600 files)", len(closed), root)
    return closed, problems


@checks.register(checks.Tags.security)
def data_dir_owner_only(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """Refuse to start while something in the data directory stays readable by other users."""
    root = Path(settings.TUNA_DATA_DIR)
    _, problems = data_dir_close(root)
    if not problems:
        return []
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return [
        checks.Error(
            f"The data directory {root} (TUNA_DATA_DIR) must be readable by its owner only, and {len(problems)} path(s) in it "
            f"could not be closed: {shown}.",
            hint=f"Run the server as the owner of {root}, or `chown -R <that user> {root} && chmod -R go-rwx {root}`.",
            id="tuna.E001",
        )
    ]
