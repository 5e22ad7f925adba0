"""Give memory back to the operating system after a large request.

A request with long texts (two 100k-character documents: a few thousand windows) leaves the process larger than
it was: ONNX Runtime's CPU arena keeps the blocks of its largest batch, and glibc's malloc keeps freed heap
memory in its free lists instead of returning it. When the batcher goes idle after such a request
(``MicroBatcher.on_idle``), the arena is shrunk (one tiny run with ``memory.enable_memory_arena_shrinkage``)
and ``malloc_trim(0)`` hands glibc's free pages back. Both are no-ops where they do not apply (another libc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def _libc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory(runtime: Any) -> None:
    """Collect cycles, shrink ``runtime``'s arena (if it has one) and trim the C heap."""
    gc.collect()  # what the request left in reference cycles, before the heap is trimmed
    shrink = getattr(runtime, "shrink_arena", None)
    if shrink is not None:
        shrink()
    trim = _libc_trim()
    if trim is not None:
        trim(0)
    log.debug("memory released after a large request")
