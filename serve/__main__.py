"""``python -m serve``: run the NER service with uvicorn.

The API key comes from ``NER_API_KEY`` in the environment, never a flag, so
it does not show up in process listings or shell history.
"""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(prog="serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.environ.get("NER_MODEL_DIR", "models/onnx"))
    parser.add_argument("--host", default=os.environ.get("NER_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("NER_PORT", "9090")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("NER_WORKERS", "1")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["NER_MODEL_DIR"] = args.model_dir
    uvicorn.run("serve.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers)


if __name__ == "__main__":
    main()
