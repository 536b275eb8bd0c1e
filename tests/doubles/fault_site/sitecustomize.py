"""Test-only: Python imports this at start-up (site.py) in every process whose PYTHONPATH holds this
directory, so a test's server, its replicas and the engine processes they spawn all get the faults of
PAGEDSERVE_FAULT_INJECT (`sample=SEED,step=SEED`; see tests/doubles/faults.py). Production code
has no hook for it."""
import os
import sys
from pathlib import Path

if os.environ.get("PAGEDSERVE_FAULT_INJECT"):
    sys.path.append(str(Path(__file__).resolve().parents[3]))  # the repo root, for `tests`; after the rest
    from tests.doubles.faults import install_from_env

    install_from_env()
