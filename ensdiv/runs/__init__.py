"""The drivers: everything that owns a run folder, records, resume, logging or a figure.

One module per command (``train``, ``sweep``, ``detect``, ``certify``, ``compare``, ``demo``,
``describe`` for ``info``/``gdr``) plus the tables (``report``) and figures (``plots``) drawn
from records. They stand side by side: a driver never imports another driver. What two of them
share lives below them — in the library (:mod:`ensdiv.evaluation`, :mod:`ensdiv.train`, ...) or
in the one run-folder module, :mod:`ensdiv.runs.rundir`. Each driver function can be called
from a notebook as well as from :mod:`ensdiv.cli`, which only parses and dispatches.
"""
