"""ensdiv.vocab: the names the command line parses with, defined once, torch-free."""

import subprocess
import sys

from ensdiv import fetch, vocab
from ensdiv.models import LAYERS
from ensdiv.tuning import METHODS


def test_importing_the_vocabulary_loads_nothing_heavy():
    probe = ("import sys, ensdiv.vocab, ensdiv.errors, ensdiv.runtime, ensdiv.recipes, "
             "ensdiv.tuning\nprint(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_vocabulary_matches_what_the_library_does():
    assert vocab.FETCHABLE == tuple(sorted(fetch.SOURCES))
    assert set(vocab.ARCHS) == set(LAYERS)  # every architecture has its layer count
    assert set(METHODS) < set(vocab.DIVERSITIES)
    assert vocab.METHOD_LAM == {"trs": vocab.TRS_LAM, "dverge": vocab.DVERGE_LAM}
