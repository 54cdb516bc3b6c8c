"""The error every datastore refusal raises.

It lives in its own module because both `store.py` and `integrity.py` (which `store.py`
imports) raise it; `dresd.datastore.store` re-exports it, where callers import it from.
"""

from __future__ import annotations


class DatastoreError(RuntimeError):
    """A datastore is missing, corrupt, or does not fit the model / prompt format."""
