"""A lean keep-alive HTTP/1.1 load generator over loopback (the serving benchmarks).

It shares 2 cores with the server it drives, so it parses no more than a
status line, headers and a JSON body, and holds one connection per client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable


def one_result(payload: bytes) -> bool:
    """``/v1/ner`` and ``/predict`` with one text or task: one result back."""
    return len(json.loads(payload)["results"]) == 1


class Connection:
    """One keep-alive connection; reconnects after the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        payload = await self.reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
        self.reader = self.writer = None


async def load(port: int, bodies: list[bytes], clients: int, requests: int, max_seconds: float,
               path: str = "/v1/ner", answered: Callable[[bytes], bool] = one_result) -> dict:
    """``clients`` connections send ``requests`` requests in all (or stop at ``max_seconds``) to ``path``; a
    request counts as answered when the status is 200 and ``answered(body)`` holds."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    async def client() -> None:
        conn = Connection(port)
        try:
            for i in counter:
                if time.perf_counter() > deadline:
                    break
                start = time.perf_counter()
                try:
                    status, payload = await conn.post(path, bodies[i % len(bodies)])
                    ok = status == 200 and answered(payload)
                except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
                    status, ok = repr(exc), False
                    await conn.close()
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(str(status))
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - start
    latencies.sort()
    done = len(latencies)
    return {
        "clients": clients, "requests": done + len(errors), "ok": done, "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5], "seconds": round(seconds, 2),
        "requests_per_s": round(done / seconds, 1),
        "p50_ms": round(1000 * latencies[done // 2], 1) if done else None,
        "p99_ms": round(1000 * latencies[min(done - 1, int(done * 0.99))], 1) if done else None,
        "capped_by_time": done + len(errors) < requests,
    }
