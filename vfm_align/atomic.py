"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

Everything is written under a temporary sibling name (same filesystem, so the final ``os.replace``
is atomic) and renamed into place only when the block finishes without an exception; on an
exception or an interrupt the temporary is removed and any previous version is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator


def _parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return parent


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; it replaces ``path`` when the block succeeds.

    ``suffix`` keeps an extension that writers infer the format from (".nii.gz", ".npy").
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=suffix, dir=_parent(path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, concurrent_ok: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` when the block succeeds.

    An existing ``path`` is replaced. With ``concurrent_ok``, a folder that another writer put
    there between that removal and the rename (it finished the same job first) is kept and this
    temporary dropped; the caller then checks that what is there is what it wanted.
    """
    path = os.path.abspath(os.fspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=_parent(path))
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path, ignore_errors=concurrent_ok)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (concurrent_ok and os.path.isdir(path)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj, **dump_kw) -> None:
    """``json.dump(obj)`` to ``path`` atomically (indent 1 unless given)."""
    dump_kw.setdefault("indent", 1)
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, **dump_kw)
