"""Keras's `exclude_from_weight_decay`, matched with `re.search` semantics at a bounded cost.

Python's `re` backtracks, holding the GIL, so one pattern such as ``(a+)+$`` can stop the
whole server for minutes. A plain literal (``re.escape(p) == p``) is a substring test, run
here; any other pattern is searched in a short-lived child Python process (no JAX import)
that is killed after `MATCH_SECONDS`, and the pattern that ran out of time is refused.
"""

import json
import re
import subprocess
import sys
from collections.abc import Sequence

from optserve.server.errors import InvalidArgument

MATCH_SECONDS = 2.0  # wall-clock budget for searching every non-literal pattern in every name
_LITERAL_WORK = 10**7  # characters scanned in-process at most (patterns x name characters); beyond it, the child
_FIELD = "config.exclude_from_weight_decay"

# The child: reads {"patterns", "names"} on stdin, prints one JSON line per pattern (the indices of the
# names it searches successfully), so a parent that kills it knows which pattern was running.
_CHILD = """
import json, re, sys
job = json.loads(sys.stdin.read())
names = job["names"]
for pattern in job["patterns"]:
    search = re.compile(pattern).search
    sys.stdout.write(json.dumps([i for i, name in enumerate(names) if search(name)]) + "\\n")
    sys.stdout.flush()
"""


def excluded_names(patterns: Sequence[str], names: Sequence[str], timeout: float = MATCH_SECONDS) -> frozenset[str]:
    """The names that at least one pattern matches anywhere (`re.search(pattern, name)`).

    Raises InvalidArgument naming ``config.exclude_from_weight_decay[i]`` for the first
    pattern whose search does not finish within `timeout` seconds (all non-literal
    patterns share that budget).
    """
    literal = {i for i, p in enumerate(patterns) if re.escape(p) == p}
    if len(literal) * sum(len(name) for name in names) > _LITERAL_WORK:
        literal = set()
    excluded = {name for name in names if any(patterns[i] in name for i in literal)}
    others = [(i, p) for i, p in enumerate(patterns) if i not in literal]
    if others:
        matched, failure = _search_in_child([p for _, p in others], list(names), timeout)
        if failure:
            index, pattern = others[min(len(matched), len(others) - 1)]
            raise InvalidArgument(f"{_FIELD}[{index}]: matching {pattern[:80]!r} against the {len(names)} tensor "
                                  f"names {failure}; simplify the pattern")
        excluded.update(names[i] for hits in matched for i in hits)
    return frozenset(excluded)


def _search_in_child(patterns: list[str], names: list[str], timeout: float) -> tuple[list[list[int]], str]:
    """Per pattern, the indices of the names it matches, and why the child stopped early ("" if it did not)."""
    job = json.dumps({"patterns": patterns, "names": names})
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    failure = ""
    try:
        out, _ = child.communicate(job, timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()  # what it printed before the kill
        failure = f"took longer than {timeout:g} s (a pattern that backtracks catastrophically)"
    matched = [json.loads(line) for line in out.splitlines() if line.endswith("]")]  # a cut-off line has no ]
    if not failure and (child.returncode != 0 or len(matched) != len(patterns)):
        failure = f"failed (the matching process exited with status {child.returncode})"
    return matched, failure
