"""Memory comes back after a large request: the service's RSS after two 100k-character texts returns to within a
bound of its RSS before them (ONNX Runtime's arena shrunk, glibc's heap trimmed, no references kept).

Real service process, real ONNX Runtime; the check is on memory, never on time.
"""

import httpx
import pytest

from tests.service_process import ServiceProcess

pytestmark = pytest.mark.slow
LONG = ("Barack Obama visited Paris and met Angela Merkel in Berlin. " * 1700)[:100_000]
#: ONNX runs of 512 windows: the test model's windows are short (64 sub-tokens), so large runs are what make its
#: arena grow the way MiniLM's 512-token windows make it grow with the default settings.
ENV = {"NER_API_KEY": "", "NER_ONNX_BATCH_SIZE": "512", "NER_MAX_BATCH_SIZE": "512"}
#: RSS the service may keep after the large request. Measured in-process with these settings: +91 MB without the
#: release, +14 MB with it; over HTTP the answer's ~35,000 entities leave some more (the default settings: +17 MB
#: with the release). MiniLM-L6, default settings, in-process: +268 MB without, -12 MB with.
BOUND_MB = 40


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_rss_after_two_100k_texts_falls_back_near_its_value_before(forced_onnx, tmp_path):
    with ServiceProcess(forced_onnx, tmp_path / "serve.log", env=ENV) as svc, \
            httpx.Client(base_url=svc.url, timeout=300) as client:
        for i in range(30):  # the small-request working set: connections, kernels, caches
            assert client.post("/v1/ner", json={"texts": [f"tweet {i} from New York"] * 8}).status_code == 200
        before = rss_mb(svc.proc.pid)
        big = client.post("/v1/ner", json={"texts": [LONG, LONG]})
        assert big.status_code == 200 and len(big.json()["results"]) == 2
        del big
        # answered after the worker's release: the release is queued when the large request's answer is sent
        assert client.post("/v1/ner", json={"texts": ["Barack Obama in Paris"]}).status_code == 200
        after = rss_mb(svc.proc.pid)
    assert after - before < BOUND_MB, f"RSS {before:.0f} MB before, {after:.0f} MB after"
