"""``python -m serve``: run the NER service with uvicorn.

Every flag has a ``NER_*`` environment variable (flags win). The API key comes
from ``NER_API_KEY`` only, never a flag, so it does not show up in process
listings or shell history. ``kill -HUP <pid>`` reloads the model if its folder
changed (with ``--workers`` above 1, uvicorn restarts the workers instead).
"""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from serve.app import Settings

FLAGS = {  # flag -> Settings field (its environment variable is Settings.ENV[field])
    "--model-dir": "model_dir",
    "--max-batch-size": "max_batch_size",
    "--max-wait-ms": "max_wait_ms",
    "--onnx-batch-size": "onnx_batch_size",
    "--max-texts": "max_texts",
    "--max-chars": "max_chars",
    "--max-body-bytes": "max_body_bytes",
    "--threads": "threads",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="serve", description=__doc__.splitlines()[0])
    defaults = Settings()
    for flag, name in FLAGS.items():
        env = Settings.ENV[name]
        parser.add_argument(flag, default=None, help=f"${env}; default {getattr(defaults, name)}")
    parser.add_argument("--quantized", action="store_true", default=None,
                        help="serve model.int8.onnx ($NER_QUANTIZED=1)")
    parser.add_argument("--host", default=os.environ.get("NER_HOST", "127.0.0.1"), help="$NER_HOST")
    parser.add_argument("--port", type=int, default=int(os.environ.get("NER_PORT", "9090")), help="$NER_PORT")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("NER_WORKERS", "1")),
                        help="$NER_WORKERS; each worker loads the model and batches on its own")
    args = parser.parse_args()
    # The app is built by a factory in each worker: hand the settings over through the environment.
    for flag, name in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            os.environ[Settings.ENV[name]] = str(value)
    if args.quantized:
        os.environ[Settings.ENV["quantized"]] = "1"
    try:
        Settings.from_env()  # a bad value stops here with one line, before uvicorn starts
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # serve.access writes one JSON line per request; uvicorn's own access log would repeat it
    uvicorn.run("serve.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                access_log=False)


if __name__ == "__main__":
    main()
