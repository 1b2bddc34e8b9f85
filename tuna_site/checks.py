"""The data directory is owner-only: its folders 0700, its files 0600.

It holds the database (password hashes, API key digests), the secret key, every user's datasets and models.
Everything this site's processes create there is made owner-only by the umask the settings set
(`tuna_site.env.owner_only_umask`). What an older version (or a copy, or a restore) left open is closed by
`data_dir_close`: when each process starts (`TunaSiteConfig.ready`) and when Django's system checks run. It walks
only what LLM Tuna makes there (`own_paths`: the data directory itself, its database, secret_key, first-admin.txt,
datasets/, jobs/, and the model cache, GGUF and static folders where they lie inside it), never following a link.
A path this process cannot close (another user's file) is a system check error: `manage.py` commands, the worker
and runserver refuse to start until the operator fixes it.
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


# What LLM Tuna itself makes at the top of the data directory. Nothing else there is touched: a file or folder the
# operator keeps beside them is theirs.
OWN_FILES = ("secret_key", "first-admin.txt", "tuna.sqlite3", "tuna.sqlite3-wal", "tuna.sqlite3-shm", "tuna.sqlite3-journal")
OWN_FOLDERS = ("datasets", "jobs")  # uploads; each job's adapter, checkpoints, tracking files and exports


def own_paths(root: Path) -> tuple[list[Path], list[Path]]:
    """(files, folders) LLM Tuna makes in the data directory `root`, as the settings place them: the files above and
    the SQLite database (with its -wal/-shm/-journal) when it lies in `root`; the folders above, and the model cache
    (TUNA_MODEL_CACHE_DIR), the converted GGUF bases (TUNA_GGUF_DIR) and STATIC_ROOT when they lie in `root` (set
    elsewhere, they are the operator's to manage). Only those that exist."""
    files = [root / name for name in OWN_FILES]
    database = settings.DATABASES.get("default", {})
    if database.get("ENGINE") == "django.db.backends.sqlite3" and str(database.get("NAME", "")).startswith(str(root) + os.sep):
        name = Path(database["NAME"])
        files += [name, *(name.with_name(name.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]
    folders = [root / name for name in OWN_FOLDERS]
    for setting in ("TUNA_MODEL_CACHE_DIR", "TUNA_GGUF_DIR", "STATIC_ROOT"):
        value = getattr(settings, setting, None)
        if value and Path(value).is_relative_to(root) and Path(value) != root:
            folders.append(Path(value))
    return sorted(set(files)), sorted(set(folders))


def _entries(root: Path):
    """(path, is a folder) of the data directory itself, LLM Tuna's own files there, and its own folders with
    everything in them. Links are never followed: a linked file or folder is skipped, and os.walk does not descend
    into linked folders."""
    files, folders = own_paths(root)
    yield root, True
    yield from ((path, False) for path in files)
    for top in folders:
        if top.is_symlink() or not top.is_dir():
            continue
        yield top, True
        for folder, dirs, names in os.walk(top, followlinks=False):
            yield from ((Path(folder, name), True) for name in dirs)
            yield from ((Path(folder, name), False) for name in names)


def _open_entries(root: Path):
    """(path, its stat) of every entry of `_entries` that others could read or enter (plain files and folders only)."""
    for path, _ in _entries(root):
        try:
            info = path.lstat()
        except FileNotFoundError:  # not there, or removed while we looked (a temporary file)
            continue
        if stat.S_ISLNK(info.st_mode) or not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            continue
        if info.st_mode & 0o077:
            yield path, info


def data_dir_close(root: Path | None = None) -> tuple[list[Path], list[str]]:
    """Make `root` (the data directory) and what LLM Tuna made in it (`own_paths`) owner-only. Returns (paths
    closed, problems left)."""
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
