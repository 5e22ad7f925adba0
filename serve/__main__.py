"""``python -m serve``: run the NER service with uvicorn.

Every flag has a ``NER_*`` environment variable (flags win). The API key comes
from ``NER_API_KEY`` only, never a flag, so it does not show up in process
listings or shell history. ``kill -HUP <pid>`` reloads the model if its folder
changed (with ``--workers`` above 1, uvicorn restarts the workers instead).
The model is loaded before the server starts: a folder that does not load
stops here with one line naming it and what is wrong (exit status 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import uvicorn

from pipeline.core.errors import PipelineError
from serve.app import create_app
from serve.settings import Settings

log = logging.getLogger("serve")

FLAGS = {  # flag -> Settings field (its environment variable is Settings.ENV[field])
    "--model-dir": "model_dir",
    "--max-batch-size": "max_batch_size",
    "--max-wait-ms": "max_wait_ms",
    "--max-batch-tokens": "max_batch_tokens",
    "--onnx-batch-size": "onnx_batch_size",
    "--bulk-chars": "bulk_chars",
    "--max-texts": "max_texts",
    "--max-predict-tasks": "max_predict_tasks",
    "--max-predict-body-bytes": "max_predict_body_bytes",
    "--max-chars": "max_chars",
    "--max-body-bytes": "max_body_bytes",
    "--max-config-chars": "max_config_chars",
    "--threads": "threads",
    "--params": "params_file",
    "--public-url": "public_url",
}


@dataclass(frozen=True)
class ServerOptions:
    """What uvicorn needs besides the app."""

    host: str = "127.0.0.1"
    port: int = 9090
    workers: int = 1
    forwarded_allow_ips: str = ""    # proxies whose X-Forwarded-For/-Proto are believed ("" : none, "*" : any)
    graceful_timeout_s: float = 10.0  # after SIGTERM, requests still running then are cut short (503)
    event_loop: str = "auto"          # uvloop where installed (the serve extra installs it), else asyncio
    http: str = "auto"                # httptools where installed (the serve extra installs it), else h11

    ENV = {"host": "NER_HOST", "port": "NER_PORT", "workers": "NER_WORKERS",
           "forwarded_allow_ips": "NER_FORWARDED_ALLOW_IPS", "graceful_timeout_s": "NER_GRACEFUL_TIMEOUT_S",
           "event_loop": "NER_EVENT_LOOP", "http": "NER_HTTP"}
    FLAG = {"host": "--host", "port": "--port", "workers": "--workers",
            "forwarded_allow_ips": "--forwarded-allow-ips", "graceful_timeout_s": "--graceful-timeout",
            "event_loop": "--event-loop", "http": "--http"}
    HELP = {"workers": "each worker loads the model and batches on its own",
            "forwarded_allow_ips": "comma-separated proxy addresses (or networks, or *) whose X-Forwarded-For "
                                   "is believed; default none: the access log shows the peer's address",
            "graceful_timeout_s": "seconds SIGTERM waits for running requests (and half-sent bodies) "
                                  "before cutting them short with a 503",
            "event_loop": "auto (uvloop where installed, else asyncio), uvloop or asyncio",
            "http": "HTTP/1.1 parser: auto (httptools where installed, else h11), httptools or h11"}

    def uvicorn_kwargs(self) -> dict[str, Any]:
        trusted = self.forwarded_allow_ips.strip()
        return {"host": self.host, "port": self.port, "workers": self.workers,
                "proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or None,
                "timeout_graceful_shutdown": self.graceful_timeout_s,
                "loop": self.event_loop, "http": self.http,
                "access_log": False}  # serve.access writes one JSON line per request; uvicorn's would repeat it


def _checked(kind: Callable[[str], Any], env: str, minimum: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type`` whose error names the environment variable too (defaults come from it)."""
    def convert(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a valid {kind.__name__} (${env})") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{raw!r} is below {minimum} (${env})")
        return value
    convert.__name__ = kind.__name__
    return convert


def _one_of(name: str, *choices: str) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        if raw not in choices:
            raise ValueError(raw)
        return raw
    convert.__name__ = f"{name} ({', '.join(choices)})"
    return convert


SERVER_TYPES: dict[str, tuple[Callable[[str], Any], float | None]] = {
    "host": (str, None), "port": (int, 0), "workers": (int, 1), "forwarded_allow_ips": (str, None),
    "graceful_timeout_s": (float, 0), "event_loop": (_one_of("event loop", "auto", "asyncio", "uvloop"), None),
    "http": (_one_of("HTTP parser", "auto", "h11", "httptools"), None)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve", description=__doc__.splitlines()[0])
    defaults = Settings()
    for flag, name in FLAGS.items():
        env = Settings.ENV[name]
        parser.add_argument(flag, default=None, help=f"${env}; default {getattr(defaults, name)}")
    parser.add_argument("--quantized", action="store_true", default=None,
                        help="serve model.int8.onnx ($NER_QUANTIZED=1)")
    parser.add_argument("--ort-spin-after-call", action="store_true", default=None,
                        help="ONNX Runtime's threads keep spinning after each call ($NER_ORT_SPIN_AFTER_CALL=1): "
                             "a shorter tail for small requests beside a bulk one, less throughput (README)")
    parser.add_argument("--no-loop", action="store_true", default=None,
                        help="Start Training does nothing ($NER_LOOP=0); default: it trains a candidate (README)")
    for f in fields(ServerOptions):
        env = ServerOptions.ENV[f.name]
        kind, minimum = SERVER_TYPES[f.name]
        parser.add_argument(ServerOptions.FLAG[f.name], dest=f.name, type=_checked(kind, env, minimum),
                            default=os.environ.get(env) or str(f.default),
                            help=f"${env}; default {f.default!r}. {ServerOptions.HELP.get(f.name, '')}".strip())
    return parser


def server_options(argv: list[str] | None = None) -> ServerOptions:
    """The server options from ``argv`` and the environment (flags win)."""
    args = build_parser().parse_args(argv)
    return ServerOptions(**{f.name: getattr(args, f.name) for f in fields(ServerOptions)})


def io_stack(options: ServerOptions) -> tuple[str, str]:
    """The event loop and HTTP parser uvicorn will use; one named explicitly must be installed."""
    chosen = []
    for setting, fast, fallback in ((options.event_loop, "uvloop", "asyncio"), (options.http, "httptools", "h11")):
        installed = importlib.util.find_spec(fast) is not None
        if setting == fast and not installed:
            raise SystemExit(f"serve: {fast} is not installed (pip install -e '.[serve]', or --event-loop/--http auto)")
        if setting == "auto":
            setting = fast if installed else fallback
        chosen.append(setting)
    return chosen[0], chosen[1]


def app_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Flags into the environment (the worker processes build the app from it), then the settings from it."""
    for flag, name in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            os.environ[Settings.ENV[name]] = str(value)
    if args.quantized:
        os.environ[Settings.ENV["quantized"]] = "1"
    if args.no_loop:
        os.environ[Settings.ENV["loop"]] = "0"
    if args.ort_spin_after_call:
        os.environ[Settings.ENV["ort_spin_after_call"]] = "1"
    try:
        return Settings.from_env()  # a bad value stops here with one line, before uvicorn starts
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = app_settings(args, parser)
    options = ServerOptions(**{f.name: getattr(args, f.name) for f in fields(ServerOptions)})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    event_loop, http = io_stack(options)
    log.info("event loop %s, HTTP parser %s", event_loop, http)
    if options.workers > 1 and settings.loop:  # each worker would run jobs of its own: two trainers at once
        log.warning("the labelling loop needs one worker; with --workers %d, Start Training does nothing "
                    "(run a one-worker service for training)", options.workers)
        os.environ[Settings.ENV["loop"]] = "0"
        settings = Settings.from_env()
    try:
        app = create_app(settings=settings)  # loads and warms up the model: a refusal stops here
    except PipelineError as exc:  # a model folder that does not load, a params file that does not parse
        log.error("%s", exc)
        raise SystemExit(1) from None
    if options.workers > 1:  # each worker builds its own app from the environment
        del app
        uvicorn.run("serve.app:app_from_env", factory=True, **options.uvicorn_kwargs())
    else:
        uvicorn.run(app, **options.uvicorn_kwargs())


if __name__ == "__main__":
    main()
