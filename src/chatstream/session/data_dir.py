"""The data folder (sessions database, cookie secret), and the secret kept in it."""

from __future__ import annotations

import logging
import os
import secrets
import stat
import time
from pathlib import Path

logger = logging.getLogger("chatstream.session")

DATA_DIR_ENV = "CHATSTREAM_DATA_DIR"
SECRET_FILE = "session_secret"


def default_data_dir() -> Path:
    """``$CHATSTREAM_DATA_DIR``, else ``$XDG_DATA_HOME/chatstream``, else ``~/.local/share/chatstream``."""
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative path
        return Path(xdg) / "chatstream"
    return Path.home() / ".local" / "share" / "chatstream"


def load_or_create_secret(data_dir: Path) -> str:
    """The cookie-signing secret kept in ``data_dir/session_secret``, created on first use.

    Keeping it on disk means a restart keeps every session. It is created with O_CREAT|O_EXCL
    and mode 0600, so of two processes starting together exactly one writes it and both use it.
    A file that others may read is refused: whoever reads it can forge any session's cookie.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(secrets.token_urlsafe(32) + "\n")  # the newline marks a complete write
        file.flush()
        os.fsync(file.fileno())
    logger.info("Created a new session secret in %s", path)
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    if os.name == "posix":
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(
                f"{path} is accessible by other users (mode {stat.filemode(mode)}); anyone who can read it "
                f"can forge session cookies. Fix it with: chmod 600 {path}"
            )
    deadline = time.monotonic() + 1.0
    while True:  # another process may have created the file and not finished writing it yet
        text = path.read_text(encoding="utf-8")
        if text.endswith("\n") and text.strip():
            return text.strip()
        if time.monotonic() > deadline:
            if text.strip():  # written by hand without a final newline
                return text.strip()
            raise ValueError(f"{path} is empty; delete it to have a new session secret made")
        time.sleep(0.01)
