"""Publishing a checkpoint all at once: write into a temporary directory, then rename it into place.

Protocol (save.py drives it): rank 0 creates ``<path>.tmp-<id>/``; every rank writes its file there, flushed
to disk (fsync); once every rank has reported its chunks' checksums, rank 0 writes ``index.json`` and its
digest last and renames the directory to ``<path>``. A ``<path>`` that exists is replaced in three renames:
old aside to ``<path>.old-<id>``, new in, old deleted. So at every instant ``<path>`` is either the previous complete
checkpoint or the new complete one; a rank killed mid-save leaves only a ``.tmp-`` directory, which the next
save to the same path removes. The one window with no ``<path>`` (between the two renames) leaves the
previous checkpoint intact as ``<path>.old-<id>``; ``missing_checkpoint_message`` points there.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid

__all__ = ["new_temp_dir", "publish", "discard", "missing_checkpoint_message"]


def new_temp_dir(path: str) -> str:
    """A fresh ``<path>.tmp-<id>`` beside ``path`` (rank 0 only); stale ones of killed saves are removed first."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if os.path.isdir(path):  # a complete checkpoint exists: older .old- directories are leftovers
        for stale in glob.glob(glob.escape(path) + ".old-*"):
            shutil.rmtree(stale, ignore_errors=True)
    temp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(temp)
    return temp


def publish(temp: str, path: str) -> None:
    """Rename the finished ``temp`` directory to ``path``, replacing a previous checkpoint there."""
    path = os.path.abspath(path)
    _fsync_dir(temp)
    aside = None
    if os.path.lexists(path):
        aside = f"{path}.old-{os.path.basename(temp).rsplit('-', 1)[-1]}"
        os.rename(path, aside)
    os.rename(temp, path)
    _fsync_dir(os.path.dirname(path))
    if aside is not None:
        shutil.rmtree(aside) if os.path.isdir(aside) and not os.path.islink(aside) else os.remove(aside)


def discard(temp: str) -> None:
    shutil.rmtree(temp, ignore_errors=True)


def missing_checkpoint_message(path: str) -> str:
    """Why there is no checkpoint at ``path``, and what to do (an interrupted publish leaves ``.old-``)."""
    path = os.path.abspath(path)
    message = f"no checkpoint at {path} (no {os.path.join(path, 'index.json')})"
    olds = sorted(glob.glob(glob.escape(path) + ".old-*"))
    if olds:
        message += (f"; a save was interrupted while publishing and the previous checkpoint is intact at {olds[-1]}: "
                    f"rename it to {path}")
    elif glob.glob(glob.escape(path) + ".tmp-*"):
        message += "; only an unfinished save (.tmp- directory) is there: that save never completed"
    return message


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
