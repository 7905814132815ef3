"""Errors raised on purpose by fmri-data.

Every error about a file names the file and the cause in one line, so that a
conversion log of thousands of runs can be grepped and acted upon. Invalid arguments and
settings (of :mod:`fmri_data.derive`, :mod:`fmri_data.resample`, :mod:`fmri_data.train`) raise
:class:`SettingError`, a :class:`ValueError`.
"""

from __future__ import annotations

import os
import re


def one_line(text: str) -> str:
    """``text`` with its line breaks (and the indentation after them) folded into single
    spaces, so a message from a library (nibabel, botocore) keeps the one-line contract."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()


class FmriDataError(Exception):
    """Base class of all errors fmri-data raises deliberately."""


class InputError(FmriDataError):
    """A source file (BOLD series, sidecar, mask, atlas, events, confounds) is unusable.

    ``str(error)`` is ``"<path>: <cause>"``.
    """

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = str(path)
        self.cause = one_line(cause)
        super().__init__(f"{self.path}: {self.cause}")


class RecipeError(FmriDataError):
    """A recipe is missing, malformed, or fails its JSON Schema."""


class StoreError(FmriDataError):
    """The output store cannot be created, opened, or fails its contract."""


class ComputeError(FmriDataError):
    """Where runs should execute is unusable: a Dask scheduler that cannot be reached, a
    cluster that cannot be started (no ``sbatch``), a cluster lost mid-conversion."""


class SettingError(FmriDataError, ValueError):
    """An argument or setting is out of its documented range, or does not fit the data it is
    applied to (an unknown family, method or device; a window longer than the run; a tensor
    of the wrong shape).

    It is a :class:`ValueError` too, so ``except ValueError`` keeps catching it; the message
    names the argument and the value given.
    """
