"""Import a module when it is first used, safely from any thread.

Heavy dependencies (scipy's submodules, nilearn, pandas, torch) are imported by the function
that needs them, so that ``fmri-data`` starts fast. Those functions run in the conversion's
worker threads, and CPython cannot import one package from several threads at once when the
package imports itself circularly: a second thread sees a partially initialized module
(``ImportError: cannot import name 'PytestTester' from partially initialized module
'scipy._lib._testutils'``) or the import machinery raises ``_DeadlockError``
(nilearn.masking and nilearn.datasets both pulling in scikit-learn). :func:`load_module`
serializes such first imports behind one lock; once a module is imported it is a dictionary
lookup.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType

_LOCK = threading.RLock()  # re-entrant: a module imported here may itself call load_module


def load_module(name: str) -> ModuleType:
    """The module ``name`` (``"scipy.ndimage"``), imported by one thread at a time.

    Every function-level import of a third-party package in code a worker thread can run goes
    through here (``ndimage = load_module("scipy.ndimage")``); an ``import`` statement at the top
    of a module needs nothing, as it runs when that module is imported.

    Raises:
        ImportError: the module is not installed or its import fails.
    """
    module = sys.modules.get(name)  # there but still initializing: another thread is importing it
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        return module
    with _LOCK:
        return importlib.import_module(name)
