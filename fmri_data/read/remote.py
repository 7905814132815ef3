"""Inputs on any fsspec filesystem: fetch a run's remote files into a private local folder.

A run's sources are read sequentially and whole (gzip streams cannot be read at random),
so each worker downloads the files of the run it converts into a temporary folder, reads
them lazily from there, and deletes them when the run is done: disk use is one run's
files per concurrent run. Local paths are used in place. Credentials come from each
filesystem's standard environment and configuration (``AWS_*`` variables, ``~/.aws``,
``GOOGLE_APPLICATION_CREDENTIALS``, ...) or from ``storage_options``
(``{"anon": True}`` for public buckets such as OpenNeuro's).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import InputError
from ..imports import load_module


def is_url(path: str) -> bool:
    """True for fsspec URLs other than ``file://`` (``s3://``, ``gs://``, ``memory://``...)."""
    return "://" in str(path) and not str(path).startswith("file://")


@contextmanager
def local_copies(paths: Iterable[str | None], storage_options: dict[str, Any] | None = None) -> Iterator[dict[str, str]]:
    """Map each path to a local file, downloading remote ones for the duration of the block.

    Args:
        paths: local paths or fsspec URLs (None entries are ignored).
        storage_options: fsspec options for the remote filesystem.

    Yields:
        ``{original: local path}``; local paths map to themselves.

    Raises:
        InputError: a remote file cannot be fetched (names the URL).
    """
    fsspec = load_module("fsspec")
    wanted = [p for p in dict.fromkeys(paths) if p]
    remote = [p for p in wanted if is_url(p)]
    mapping = {p: p for p in wanted if not is_url(p)}
    if not remote:
        yield mapping
        return
    folder = tempfile.mkdtemp(prefix="fmri-data-", dir=os.environ.get("FMRI_DATA_TMPDIR"))
    try:
        for i, url in enumerate(remote):
            local = os.path.join(folder, f"{i:03d}", posixpath.basename(url))
            os.makedirs(os.path.dirname(local))
            try:
                fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
                fs.get_file(path, local)
            except Exception as exc:  # network, permission, missing key: all name the URL
                raise InputError(url, f"cannot download ({type(exc).__name__}: {exc})") from exc
            mapping[url] = local
        yield mapping
    finally:
        shutil.rmtree(folder, ignore_errors=True)
