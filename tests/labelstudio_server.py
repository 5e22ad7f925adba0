"""Start a real Label Studio server for tests.

Label Studio pins a large set of packages (Django and friends) that must not
leak into the project's own environment, so it lives in a virtualenv of its
own (see ``ensure_label_studio_venv``).  ``LabelStudioServer`` runs it as a
subprocess bound to 127.0.0.1 only, with a throwaway data directory, a known
user and a known legacy API token, so tests can talk to it with
``label_studio_sdk.LabelStudio(base_url=server.url, api_key=server.api_key)``.

This module deliberately imports nothing outside the standard library: it is
used from the project's virtualenv, which does not contain Label Studio.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Iterator

logger = logging.getLogger(__name__)

#: The Label Studio release the tests were verified against.  Pinned exactly
#: because the server's API surface and start-up behaviour change between
#: releases and a silent upgrade would make test failures hard to read.
LABEL_STUDIO_VERSION = "1.23.2"

#: Environment variable that overrides where the Label Studio venv lives.
VENV_ENV_VAR = "NER_LABEL_STUDIO_VENV"
DEFAULT_VENV_DIR = Path("~/.cache/ner-pipeline/label-studio-venv")

#: Written (atomically) only after ``pip install`` succeeded and the install
#: was checked, so a venv left behind by an interrupted install is detected
#: and rebuilt instead of being trusted because ``bin/label-studio`` exists.
INSTALLED_MARKER = ".ner-pipeline-installed"

LOOPBACK = "127.0.0.1"

#: Environment variables that Label Studio reads *without* a prefix (its
#: ``get_env`` tries ``LABEL_STUDIO_X``, ``HEARTEX_X`` and plain ``X``).  A
#: stray ``HOST``/``PORT``/``USERNAME`` in the caller's shell would otherwise
#: change the server's host URL, port or default user.
_UNPREFIXED_KEYS_TO_DROP = (
    "HOST",
    "PORT",
    "USERNAME",
    "PASSWORD",
    "USER_TOKEN",
    "BASE_DATA_DIR",
    "DATABASE_NAME",
    "DJANGO_DB",
    "DEBUG",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
)


#: urllib honours http_proxy/HTTP_PROXY; a loopback health check must not.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed, started or made healthy."""


def default_venv_dir() -> Path:
    """Where the Label Studio venv lives unless the caller says otherwise."""
    return Path(os.environ.get(VENV_ENV_VAR) or DEFAULT_VENV_DIR).expanduser()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on *path*.

    Parallel pytest workers (or two sessions) may all find the venv missing;
    the lock makes exactly one of them install while the others wait.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def _installed_version(venv_dir: Path) -> str | None:
    """Version of ``label-studio`` as the venv's own metadata reports it.

    Read through ``importlib.metadata`` rather than ``label-studio --version``
    (which starts a full server on 0.0.0.0:8080) or ``import label_studio.server``
    (which loads Django settings and creates ``~/.local/share/label-studio``).
    """
    python = _venv_python(venv_dir)
    if not python.exists():
        return None
    code = (
        "import importlib.metadata as m, label_studio, django, rest_framework;"
        "print(m.version('label-studio'))"
    )
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _install_is_sound(venv_dir: Path) -> bool:
    """Whether an unmarked venv holds a complete install of the pinned version.

    Used to adopt a venv that was installed by hand (without our marker): the
    version must match and ``pip check`` must find no missing dependency.
    """
    if not (venv_dir / "bin" / "label-studio").exists():
        return False
    if _installed_version(venv_dir) != LABEL_STUDIO_VERSION:
        return False
    check = subprocess.run(
        [str(_venv_python(venv_dir)), "-m", "pip", "check"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        logger.warning("pip check failed in %s:\n%s", venv_dir, check.stdout[-2000:])
        return False
    return True


def _write_marker(venv_dir: Path) -> None:
    """Write the installed marker atomically (temp file + rename)."""
    marker = venv_dir / INSTALLED_MARKER
    tmp = marker.with_name(marker.name + f".tmp{os.getpid()}")
    tmp.write_text(LABEL_STUDIO_VERSION + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def _marker_ok(venv_dir: Path) -> bool:
    marker = venv_dir / INSTALLED_MARKER
    try:
        recorded = marker.read_text(encoding="utf-8").strip()
    except OSError:
        return False
    return recorded == LABEL_STUDIO_VERSION and (venv_dir / "bin" / "label-studio").exists()


def ensure_label_studio_venv(venv_dir: Path | None = None) -> Path:
    """Return the ``label-studio`` executable, installing it first if needed.

    The venv defaults to ``$NER_LABEL_STUDIO_VENV`` or
    ``~/.cache/ner-pipeline/label-studio-venv``.  Installing takes a minute or
    two, so it happens once and is reused; an interrupted install (no marker,
    failing ``pip check``) is wiped and redone.
    """
    venv_dir = (venv_dir or default_venv_dir()).expanduser().resolve()
    executable = venv_dir / "bin" / "label-studio"
    if _marker_ok(venv_dir):
        return executable

    with _file_lock(venv_dir.parent / (venv_dir.name + ".lock")):
        # Another process may have finished the install while we waited.
        if _marker_ok(venv_dir):
            return executable
        if _install_is_sound(venv_dir):
            logger.info("Adopting existing Label Studio %s install in %s", LABEL_STUDIO_VERSION, venv_dir)
            _write_marker(venv_dir)
            return executable

        if venv_dir.exists():
            logger.warning("Removing incomplete Label Studio venv at %s", venv_dir)
            shutil.rmtree(venv_dir)
        # pip's output goes to a file next to the venv (not into the test
        # output); its tail is raised if the install fails.
        install_log = venv_dir.parent / (venv_dir.name + ".install.log")
        logger.info("Creating Label Studio venv at %s (takes a minute or two; log %s)", venv_dir, install_log)
        with open(install_log, "w", encoding="utf-8") as log:
            for command in (
                [sys.executable, "-m", "venv", str(venv_dir)],
                [
                    str(_venv_python(venv_dir)),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    f"label-studio=={LABEL_STUDIO_VERSION}",
                ],
            ):
                log.write(f"$ {' '.join(command)}\n")
                log.flush()
                result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
                if result.returncode != 0:
                    log.close()
                    tail = install_log.read_text(encoding="utf-8", errors="replace")[-4000:]
                    raise LabelStudioError(f"{command[2:4]} failed with code {result.returncode}:\n{tail}")
        if not _install_is_sound(venv_dir):
            raise LabelStudioError(f"Label Studio install in {venv_dir} did not check out; see {install_log}")
        _write_marker(venv_dir)
        return executable


def free_loopback_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1.

    There is a window between closing this socket and the server binding it;
    ``LabelStudioServer`` detects the rare loss of that race (Label Studio
    then silently moves to the next port) and retries with a fresh port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


class _PortTaken(LabelStudioError):
    """Label Studio found its port busy and would have moved elsewhere."""


class LabelStudioServer:
    """A Label Studio server process on 127.0.0.1 with a known user and token.

    Use as a context manager (``with LabelStudioServer(tmp_path) as ls: ...``)
    or call ``start()``/``stop()``.  ``restart()`` keeps the port and the data
    directory, so projects and tasks survive it; tests use it to simulate an
    outage in the middle of a push.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        executable: Path | None = None,
        port: int | None = None,
        username: str = "ner-tests@example.com",
        password: str = "ner-tests-password",
        api_key: str | None = None,
        startup_timeout: float = 180.0,
        stop_timeout: float = 20.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._executable = executable
        self.port: int | None = port
        self.username = username
        self.password = password
        # Label Studio only applies a token of more than 5 characters; 40 hex
        # characters matches the length of the tokens it generates itself.
        self.api_key = api_key or secrets.token_hex(20)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_env = dict(extra_env or {})
        self.log_path = self.data_dir / "label-studio.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- public API -----------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (no trailing slash)."""
        if self.port is None:
            raise LabelStudioError("server has no port yet; call start() first")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> "LabelStudioServer":
        """Start the server and block until ``/health`` says UP."""
        if self.running:
            return self
        if self._executable is None:
            self._executable = ensure_label_studio_venv()
        self.data_dir.mkdir(parents=True, exist_ok=True)

        if self.port is not None:
            # Fixed port (explicit, or a restart): no retrying elsewhere,
            # because callers hold URLs that point at this port.
            self._start_once(self.port)
            return self

        attempts = 3
        for attempt in range(1, attempts + 1):
            self.port = free_loopback_port()
            try:
                self._start_once(self.port)
            except _PortTaken:
                logger.warning("Port %d was taken before Label Studio bound it (attempt %d)", self.port, attempt)
                self.port = None
                if attempt == attempts:
                    raise
                continue
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Terminate the server's process group; SIGKILL it if it lingers."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                logger.warning("Label Studio (pid %d) ignored SIGTERM; killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Children that outlived the leader (none expected) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        logger.info("Label Studio on port %s stopped", self.port)

    def restart(self) -> None:
        """Stop, then start again on the same port and data directory."""
        port = self.port
        self.stop()
        if port is not None:
            deadline = time.monotonic() + self.stop_timeout
            while _port_in_use(port) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.port = port
        self.start()

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of the server log (stdout and stderr together)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-max_chars:]

    def __enter__(self) -> "LabelStudioServer":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------

    def _environment(self, port: int) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("LABEL_STUDIO_", "HEARTEX_"))
            and key not in _UNPREFIXED_KEYS_TO_DROP
        }
        env.update(
            {
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                "LABEL_STUDIO_USERNAME": self.username,
                "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_USER_TOKEN": self.api_key,
                # Read only when the organization is first created (first
                # start on an empty data dir); without it the 40-char token is
                # rejected and only JWT personal access tokens work.
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                # settings.HOSTNAME; also sent to ML backends as ``hostname``.
                "LABEL_STUDIO_HOST": f"http://{LOOPBACK}:{port}",
                "DJANGO_DB": "sqlite",
                # No outbound calls: version check, analytics, Sentry.
                "LATEST_VERSION_CHECK": "false",
                "COLLECT_ANALYTICS": "false",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
                # Allow ML backends on loopback (else 403 "reserved network address").
                "ML_BLOCK_LOCAL_IP": "false",
                "SSRF_PROTECTION_ENABLED": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def _command(self, port: int) -> list[str]:
        assert self._executable is not None
        return [
            str(self._executable),
            "start",
            "--no-browser",
            # --internal-host picks the bind address; --host alone does not
            # (without --internal-host it binds 0.0.0.0).
            "--internal-host",
            LOOPBACK,
            "--host",
            f"http://{LOOPBACK}:{port}",
            "--port",
            str(port),
        ]

    def _start_once(self, port: int) -> None:
        if _port_in_use(port):
            raise _PortTaken(f"port {port} on {LOOPBACK} is already in use")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        logger.info("Starting Label Studio on %s:%d (data dir %s)", LOOPBACK, port, self.data_dir)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== starting label-studio on port {port} =====\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self._command(port),
                env=self._environment(port),
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group, so stop() gets all of it
            )
        atexit.register(self.stop)
        try:
            self._wait_healthy(port)
        except BaseException:
            self.stop()
            raise

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self._log_offset)
                return handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _wait_healthy(self, port: int) -> None:
        started = time.monotonic()
        deadline = started + self.startup_timeout
        health_url = f"http://{LOOPBACK}:{port}/health"
        while True:
            process = self._process
            assert process is not None
            returncode = process.poll()
            if returncode is not None:
                raise LabelStudioError(
                    f"Label Studio exited with code {returncode} before becoming healthy; "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            # Label Studio moves to the next free port instead of failing when
            # its port is busy; a health check on our port would then hit
            # whatever else is listening there.
            if f"Port {port} is in use" in self._log_since_start():
                raise _PortTaken(f"Label Studio found port {port} busy")
            if self._health_ok(health_url):
                logger.info("Label Studio healthy on port %d after %.1f s", port, time.monotonic() - started)
                return
            if time.monotonic() > deadline:
                raise LabelStudioError(
                    f"Label Studio not healthy after {self.startup_timeout:.0f} s; "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.5)

    @staticmethod
    def _health_ok(url: str) -> bool:
        try:
            with _NO_PROXY_OPENER.open(url, timeout=2) as response:
                body = response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False
        try:
            return json.loads(body).get("status") == "UP"
        except (ValueError, AttributeError):
            return False
