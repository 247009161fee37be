"""The drivers: everything that owns a run folder, records, resume, logging or a figure.

One module per command, named after it (``train``, ``sweep``, ``detect``, ``certify``,
``compare``, ``evaluate``, ``demo``, ``describe`` for ``info``/``gdr``) plus the figures
(``plots``) drawn from records. They stand side by side: a driver never imports another
driver. What two of them share lives below them — in the library (:mod:`ensdiv.training`,
:mod:`ensdiv.card`, :mod:`ensdiv.certification`, ...) or in one of three driver-side modules
with one job each: run folders (:mod:`ensdiv.runs.rundir`), reading records
(:mod:`ensdiv.runs.records`) and rendering tables (:mod:`ensdiv.runs.report`). Each driver
function can be called from a notebook as well as from :mod:`ensdiv.cli`, which only parses
and dispatches.
"""
