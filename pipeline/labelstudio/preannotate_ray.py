"""The Ray engine of streaming predict (``predict.engine: ray``): Ray Data actors predict, the driver writes.

The driver settles the job as the local engine does (one pass over the export: counts, checks, and the byte
offset where every chunk of ``job.chunk`` selected tasks begins), then hands Ray Data one row per chunk: its
byte range. ``map_batches`` gives the rows to a callable class, one instance per actor, each holding one
runtime (one ONNX Runtime session, its intra-op threads = the actor's CPUs); an actor reads its chunk's range
of the export itself, predicts the chunk whole (the same batches as the local engine, so the same floats) and
returns each task as its shard line. The driver reads the results back in order (``preserve_order``, streamed
with ``iter_batches``) and writes the shards: the same bytes as the local engine, and the same resume.

So the export and the model folder must be readable at the same absolute path on every node (each actor
checks both against the driver's sha256 when it starts). Gzip exports cannot be read by byte range: the
engine refuses them. Ray is imported here only, when the engine runs: ``pip install ".[scale]"``.

Which Ray: ``RAY_ADDRESS`` names a running cluster (``ray start --head`` prints it; ``auto`` finds one started
on this machine); without it a local Ray starts for the run and stops after it. A Ray this process already
runs (``ray.init`` by the caller) is used as it is.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import PredictRayConfig
from pipeline.core.errors import PipelineError
from pipeline.core.textfile import GZIP_MAGIC
from pipeline.labelstudio.preannotate import Engine, Job, Predictor, select_tasks
from pipeline.labelstudio.shards import file_sha256
from pipeline.labelstudio.tasks import iter_export_at, task_text

log = logging.getLogger(__name__)

INSTALL = 'pip install ".[scale]"'


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise PipelineError(f"predict.engine: ray needs Ray Data ({exc.name} is not installed): {INSTALL}") from None
    return ray


def ray_engine(make_runtime: Callable[..., Predictor], options: PredictRayConfig,
               same_files: dict[str, str] | None = None) -> Engine:
    """An ``Engine`` that predicts on Ray actors; ``make_runtime(threads=N)`` builds one actor's runtime (it is
    pickled to the actors: a ``functools.partial`` of the runtime class with an absolute model path).
    ``same_files`` maps absolute paths to the sha256 every actor must find there (the model graph)."""
    ray = import_ray()  # here, before a run reads its export: a missing extra is said at once

    def rows(job: Job, first: int) -> Iterator[tuple[int, str, int]]:
        check_input(job.export)
        ranges = chunk_ranges(job, first)
        if not ranges:
            return
        export = job.export.resolve()  # the actors' working folder is not ours
        files = {str(export): job.sha256 or file_sha256(export), **(same_files or {})}
        job = replace(job, export=export, starts=())
        with connected(ray):
            actors = min(actor_count(ray, options), len(ranges))  # an actor without a chunk would only load the model
            log.info("Ray: %d actors of %d CPU each predict %d chunks of %d tasks", actors, options.cpus_per_actor,
                     len(ranges), job.chunk)
            yield from run_dataset(ray, job, ranges, actors, options.cpus_per_actor,
                                   {"make_runtime": make_runtime, "threads": options.cpus_per_actor,
                                    "job": job, "same_files": files})

    return rows


def check_input(export: Path) -> None:
    with export.open("rb") as fh:
        gzipped = fh.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    if gzipped:
        raise PipelineError(f"{export}: predict.engine ray reads the export by byte ranges on every node, which a "
                            "gzip file does not allow: decompress it (gunzip) or use predict.engine local")


def chunk_ranges(job: Job, first: int) -> list[dict[str, int]]:
    """One row per chunk from the one holding selected task ``first``: its number and byte range (stop -1: to
    the end of the file)."""
    starts = list(job.starts)
    return [{"chunk": k, "start": starts[k], "stop": starts[k + 1] if k + 1 < len(starts) else -1}
            for k in range(first // job.chunk, len(starts))]


@contextmanager
def connected(ray: Any) -> Iterator[None]:
    """Ray for the run: the caller's, a cluster at ``RAY_ADDRESS``, or a local one started (and stopped) here."""
    if ray.is_initialized():
        log.info("Ray: using the Ray this process already runs (%s CPUs)", ray.cluster_resources().get("CPU", 0))
        yield
        return
    address = os.environ.get("RAY_ADDRESS", "")
    try:
        check_reachable(address)
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        raise PipelineError(f"Ray: cannot connect to the cluster at RAY_ADDRESS={address}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    cpus = ray.cluster_resources().get("CPU", 0)
    if address:
        log.info("Ray: connected to the cluster at RAY_ADDRESS=%s (%d nodes, %g CPUs)", address, nodes, cpus)
    else:
        log.info("Ray: no RAY_ADDRESS, started a local Ray on this machine (%g CPUs)", cpus)
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) that takes no TCP connection fails here at once: ``ray.init``
    would retry it for minutes."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "", "auto", "local": ray.init answers those itself
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


def actor_count(ray: Any, options: PredictRayConfig) -> int:
    """``predict.ray.actors``, or as many as the cluster's CPUs hold; refused when the cluster cannot place them
    (Ray would wait for them forever)."""
    cpus = options.cpus_per_actor
    total = int(ray.cluster_resources().get("CPU", 0))
    biggest = max((int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0)
    if cpus > biggest:
        raise PipelineError(f"predict.ray.cpus_per_actor: {cpus} CPUs per actor, but the biggest Ray node has "
                            f"{biggest}: lower it")
    actors = options.actors or total // cpus
    if actors * cpus > total:
        raise PipelineError(f"predict.ray.actors: {actors} actors x {cpus} CPU need {actors * cpus} CPUs, the Ray "
                            f"cluster has {total}: lower predict.ray.actors (0: as many as fit)")
    return actors


def run_dataset(ray: Any, job: Job, ranges: list[dict[str, int]], actors: int, cpus: int,
                constructor: dict[str, Any]) -> Iterator[tuple[int, str, int]]:
    """Ray Data over the chunk rows, results streamed back in order; a worker's error raised here as itself."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        dataset = ray.data.from_items(ranges, override_num_blocks=min(len(ranges), 4096)).map_batches(
            ChunkPredictor, batch_size=1, batch_format="numpy", concurrency=actors, num_cpus=cpus,
            fn_constructor_kwargs=constructor, runtime_env=actor_env(cpus))
        expected = ranges[0]["chunk"] * job.chunk
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for index, line, entities in zip(batch["index"], batch["line"], batch["entities"]):
                if int(index) != expected:
                    raise PipelineError(f"Ray returned task {int(index)} where task {expected} belongs")
                yield expected, str(line), int(entities)
                expected += 1
    except ray.exceptions.RayError as exc:
        raise worker_error(exc) from None
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved


def actor_env(cpus: int) -> dict[str, Any]:
    """Each actor's threads bounded by its CPUs: ONNX Runtime's get ``cpus`` from the runtime, and the tokenizer's
    (Rust, rayon: one per core of the node by default, as ``encode_batch`` spreads a chunk's texts) from
    ``RAYON_NUM_THREADS``, read when its pool starts, so it is set before the actor's process does."""
    return {"env_vars": {"RAYON_NUM_THREADS": str(cpus)}}


def worker_error(exc: BaseException) -> PipelineError:
    """The first line of what went wrong on a worker (our own errors as they are)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, PipelineError):
        cause = getattr(cause, "cause", None) or cause.__cause__
    if isinstance(cause, PipelineError):
        return cause
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return PipelineError(f"predict.engine ray: a Ray worker failed: {first}")


class ChunkPredictor:
    """One actor: one runtime; each row in is one chunk's byte range, each row out one task's shard line."""

    def __init__(self, make_runtime: Callable[..., Predictor], threads: int, job: Job,
                 same_files: dict[str, str]) -> None:
        for path, sha in same_files.items():
            if not Path(path).is_file():
                raise PipelineError(f"{path} not found on Ray node {socket.gethostname()}: the export and the "
                                    "model folder must be at the same path on every node (a shared folder)")
            if file_sha256(path) != sha:
                raise PipelineError(f"{path} on Ray node {socket.gethostname()} is not the driver's file "
                                    "(sha256 differs): every node must read the same export and model")
        self.runtime = make_runtime(threads=threads)
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index, lines, entities = [], [], []
        for chunk, start, stop in zip(batch["chunk"], batch["start"], batch["stop"]):
            tasks = self.tasks(int(chunk), int(start), None if stop < 0 else int(stop))
            preds = self.runtime.predict([task_text(t, self.job.config.data_key) for t in tasks])
            for i, (task, pred) in enumerate(zip(tasks, preds)):
                line, count = self.job.line(task, pred)
                index.append(int(chunk) * self.job.chunk + i)
                lines.append(line)
                entities.append(count)
        return {"index": np.array(index, dtype=np.int64), "line": np.array(lines, dtype=object),
                "entities": np.array(entities, dtype=np.int64)}

    def tasks(self, chunk: int, start: int, stop: int | None) -> list[dict[str, Any]]:
        """The chunk's selected tasks, read from its byte range; exactly as many as the driver counted."""
        job = self.job
        tasks = list(select_tasks((task for _, task in iter_export_at(job.export, start, stop)), job.which))
        want = min(job.chunk, job.selected - chunk * job.chunk)
        if len(tasks) != want:
            raise PipelineError(f"{job.export}: chunk {chunk} (bytes {start}-{stop}) holds {len(tasks)} tasks to "
                                f"predict, the driver counted {want}: the file changed during the run")
        return tasks
