"""A pytest plugin (and importable module) that makes ``opentelemetry`` unimportable.

``python -m pytest -p tests.telemetry.no_otel tests/stores tests/events`` runs suites as
if the ``otel`` extra were not installed; ``block()`` does the same in a script.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType


class _Blocker(MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname == "opentelemetry" or fullname.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)
        return None


def block() -> None:
    """Make every ``opentelemetry`` import fail from now on (call before importing ours)."""
    if any(name.startswith("opentelemetry") for name in sys.modules):
        raise RuntimeError("opentelemetry is imported already")
    sys.meta_path.insert(0, _Blocker())


block()
