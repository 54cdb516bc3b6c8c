"""Imported first by a job run as a script (`python jobs/x.py`, also under `ray job submit`).

Then sys.path[0] is jobs/, where build.py would shadow any top-level module named `build`.
Put the repository root there instead, so the code next to this file (the uploaded
--working-dir under `ray job submit`) is what gets imported, not an installed copy.
"""

import sys
from pathlib import Path

_here, _root = Path(__file__).resolve().parent, str(Path(__file__).resolve().parents[1])
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == _here:
    sys.path[0] = _root
elif _root not in sys.path:
    sys.path.insert(0, _root)
