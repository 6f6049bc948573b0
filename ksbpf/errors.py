"""The one error type a user sees: what is wrong, and how to fix it."""

from __future__ import annotations


class KsbpfError(Exception):
    """A problem the user can act on.  str() is one line: problem; fix."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
