"""SDK adapters for storage: the task stores, their indexes, the push config store.

Both task stores share one record engine (``records``). Built on ``log`` and ``connection``.
"""
