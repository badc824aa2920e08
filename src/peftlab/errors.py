"""User-facing errors.

A `UserError` is a mistake in what the user asked for (a bad spec, a missing file). The CLI
prints its message as one line and exits with status 2; it never shows a traceback.
"""

import difflib


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


class RunFailed(Exception):
    """The run could not go on for a reason outside the user's input (a process of a
    distributed run died): one line and exit code 1."""


def close_matches(word: str, choices, n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for near misses of `word`, or ''."""
    hits = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""


def warn(message: str) -> None:
    """Tell the user something they should know but that does not stop the command: one line
    on stderr, `peftlab: warning: ...`."""
    import sys

    print(f"peftlab: warning: {message}", file=sys.stderr, flush=True)
