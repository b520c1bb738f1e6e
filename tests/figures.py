"""Figures a test measured (requests sent, failed, recovery times), for the CI log.

pytest captures what a passing test prints, so `figure(text)` also keeps the line, and
conftest.py prints every kept line in a "figures" section at the end of the run.
"""

from __future__ import annotations

FIGURES: list[str] = []


def figure(text: str) -> None:
    print(f"\n{text}")
    FIGURES.append(text)
