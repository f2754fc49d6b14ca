"""Files that hold PHI (the SQLite store, its WAL, archived messages) are the engine user's alone.

Modes are set explicitly (chmod after create), so they do not depend on the umask the engine was
started under. Folders the engine creates are 0700; a folder that already exists is left as the
operator made it (it may be the folder engine.yaml lives in) but a warning names it when others
can enter it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
_checked: set[Path] = set()  # folders already made or looked at (a delivery writes many files into one)


def private_dir(folder: Path) -> None:
    """Create `folder` (and missing parents) 0700; warn once about an existing open one."""
    if folder in _checked and folder.is_dir():
        return
    missing: list[Path] = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another thread or process made it meanwhile
            continue
        os.chmod(path, DIR_MODE)
    if not missing and folder not in _checked:
        try:
            mode = folder.stat().st_mode
        except OSError:
            return
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("folder %s holding PHI can be entered by other users (mode %o); chmod 700 it",
                        folder, stat.S_IMODE(mode))
    _checked.add(folder)


def private_file(path: Path) -> None:
    """Make `path` 0600, creating it empty when missing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def restrict(path: Path) -> None:
    """chmod 0600 an existing file (no error when it is not there)."""
    try:
        os.chmod(path, FILE_MODE)
    except FileNotFoundError:
        pass


def open_private(path: Path) -> int:
    """A new file for writing (truncated), 0600 whatever the umask: an fd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd
