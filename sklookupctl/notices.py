"""One-line notices for the operator that are not errors (a cache ignored, say).

The CLI prints them on stderr as `note: ...`; a library user gets a warning unless they set a
sink of their own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

_sink: Callable[[str], None] | None = None


def set_sink(sink: Callable[[str], None] | None) -> None:
    global _sink
    _sink = sink


def emit(text: str) -> None:
    if _sink is not None:
        _sink(text)
    else:
        warnings.warn(text, stacklevel=2)
