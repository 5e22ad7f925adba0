"""Label configs that requests carry (``/predict``'s ``label_config``, ``/setup``'s ``schema``), checked and cached.

Label Studio sends the project's label config with every ``/predict`` call.
Parsing XML costs time in proportion to its size (more with entities), so the
service bounds the size (413), refuses text that is not valid Unicode (422),
and keeps the parsed configs of the last few distinct configs, keyed by a hash
of their content: a project's config is parsed once, not per request. Callers
on the event loop run :meth:`LabelConfigs.parse` in a worker thread
(``run_in_threadpool``), so not even that first parse holds up other requests.
Every refusal names the request field it is about.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from fastapi import HTTPException

from pipeline.core.errors import LabelConfigMismatch
from pipeline.labelstudio.labelconfig import LabelConfig, parse_label_config

MAX_CONFIG_ENV = "NER_MAX_CONFIG_CHARS"


def utf8_or_422(value: str, field: str) -> bytes:
    """``value`` as UTF-8; a lone surrogate (valid JSON, invalid Unicode) is a 422 naming ``field``."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HTTPException(status_code=422, detail=f"{field} is not valid Unicode: lone surrogate at character "
                                                    f"{exc.start}") from None


class LabelConfigs:
    """Thread-safe parse-and-cache of label configs (LRU over the last ``cache_size`` distinct contents)."""

    def __init__(self, max_chars: int, cache_size: int = 32) -> None:
        self.max_chars = max_chars
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, LabelConfig] = OrderedDict()
        self._lock = threading.Lock()

    def parse(self, xml: str, field: str) -> LabelConfig:
        """The parsed config, or an HTTP 413/422 whose detail starts with ``field``. Blocking: call off the loop."""
        if len(xml) > self.max_chars:
            raise HTTPException(status_code=413, detail=f"{field} has {len(xml)} characters; at most "
                                                        f"{self.max_chars} ({MAX_CONFIG_ENV})")
        key = hashlib.sha256(utf8_or_422(xml, field)).digest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            config = parse_label_config(xml)
        except LabelConfigMismatch as exc:
            raise HTTPException(status_code=422, detail=f"{field}: {exc}") from None
        with self._lock:
            self._cache[key] = config
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return config
