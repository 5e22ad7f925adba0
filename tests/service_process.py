"""Run ``python -m serve`` as a child process on a free loopback port (tests and the benchmark).

The server's output goes to a log file, not a pipe: a pipe nobody reads fills
up after a few hundred access-log lines and blocks the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``with ServiceProcess(model_dir, log_path, env={...}) as svc:`` ... ``svc.url``; ready on entry."""

    def __init__(self, model_dir: str | Path, log_path: str | Path, *, env: dict[str, str] | None = None,
                 args: list[str] | None = None, startup_timeout: float = 120.0, cwd: str | Path | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        # the labelling loop trains in the folder the service runs in: off unless a test gives it a project copy
        self.cwd = Path(cwd) if cwd is not None else ROOT
        self.env = dict(os.environ, **({} if cwd is not None else {"NER_LOOP": "0"}), **(env or {}))
        self.args = list(args or [])
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serve", "--model-dir", str(self.model_dir), "--port", str(self.port),
                 *self.args], cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with _NO_PROXY.open(f"{self.url}/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"service not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def signal(self, sig: int = signal.SIGHUP) -> None:
        if self.proc is None:
            raise RuntimeError("service not started")
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
