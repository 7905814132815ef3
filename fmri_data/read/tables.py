"""BIDS tables of a run: ``events.tsv`` (rows as plain dicts) and fMRIPrep ``confounds_timeseries.tsv``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..imports import load_module




# --------------------------------------------------------------------------- tables


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a BIDS ``events.tsv`` (``onset``/``duration`` in seconds, floats; ``n/a`` -> None).

    Raises:
        InputError: unreadable, missing the required ``onset``/``duration`` columns, or an
            ``onset`` (``duration``) that is not a number of seconds (``duration`` may be n/a).
    """
    pd = load_module("pandas")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot parse events table ({exc})") from exc
    missing = {"onset", "duration"} - set(table.columns)
    if missing:
        raise InputError(path, f"events table lacks required columns {sorted(missing)}")
    for column in ("onset", "duration"):  # BIDS: numbers in seconds (duration may be n/a)
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = numbers.isna() & table[column].notna()
        if column == "onset":
            bad |= table[column].isna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise InputError(path, f"events column '{column}' is not a number in seconds on row {row + 2}: "
                                   f"{table[column].iloc[row]!r}")
        table[column] = numbers
    table = table.astype(object).where(table.notna(), None)
    return [{k: _plain(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def read_confounds(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Columns and values of a confounds TSV, values float32 ``(T, C)`` (``n/a`` -> NaN).

    Raises:
        InputError: unreadable or non-numeric.
    """
    pd = load_module("pandas")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
        values = table.to_numpy(dtype=np.float32)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot parse confounds table ({exc})") from exc
    return [str(c) for c in table.columns], values


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value

