"""The doctor's report: labelled lines, loud warnings, and the problems found."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Report", "size"]


def size(n: int) -> str:
    """A byte count for people."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass
class Report:
    """The doctor's printout, and the problems it found."""

    problems: list[str] = field(default_factory=list)

    def line(self, label: str, value: str) -> None:
        """Print one labelled line."""
        print(f"{label:<13}{value}")

    def problem(self, text: str) -> None:
        """Print a loud warning and remember it."""
        self.problems.append(text)
        print(f"!!! WARNING: {text}")
