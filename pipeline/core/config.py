"""One typed config per ``params.yaml`` section: names, types, allowed values and defaults, declared once.

``params.yaml`` shows the values; these models say what each key may be. ``main()`` of a stage validates
its own section (and no other stage's) with ``XConfig.from_params(params)``; a wrong key, type or value is a
``ParamsError`` naming ``section.key``. Values typed on the command line (``dvc exp run -S
export.int8_smooth=5e-1`` arrives as a YAML string) are coerced where a number is expected. Torch-free.
(``train`` has its own dataclass, ``pipeline.train.TrainConfig``, validated the same way.)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from pipeline.core.errors import ParamsError


def validation_problems(exc: ValidationError, section: str) -> str:
    """``section.key: what is wrong (got value)``, one per problem, joined by "; "."""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in (section, *error["loc"]))
        got = "" if error["type"] == "missing" else f" (got {error['input']!r})"
        problems.append(f"{key}: {error['msg']}{got}")
    return "; ".join(problems)


class SectionConfig(BaseModel):
    """A ``params.yaml`` section: unknown keys are errors, values are read-only once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    section: ClassVar[str]

    @classmethod
    def from_params(cls, params: dict[str, Any]):
        values = params.get(cls.section)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ParamsError(f"params: section {cls.section!r} must be a mapping, got {type(values).__name__}")
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ParamsError(validation_problems(exc, cls.section)) from None


class SplitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: Literal["text", "task_id"] = "text"  # text: duplicate texts stay on one side
    dev: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)


class ConvertConfig(SectionConfig):
    section: ClassVar[str] = "convert"

    engine: Literal["exact", "ls-converter"] = "exact"
    scheme: Literal["BIO", "BIOES"] = "BIO"
    workers: NonNegativeInt = 0  # processes for large exports (0: one per core)
    overlap: Literal["longest", "error"] = "longest"
    annotations: Literal["ground_truth_or_latest", "all"] = "ground_truth_or_latest"
    unknown_label: Literal["error", "ignore"] = "error"
    bad_tasks: Literal["error", "skip"] = "error"
    split: SplitConfig = SplitConfig()


class EvaluateConfig(SectionConfig):
    section: ClassVar[str] = "evaluate"

    batch_size: PositiveInt = 64


class ExportConfig(SectionConfig):
    section: ClassVar[str] = "export"

    opset: PositiveInt = 17
    max_abs_diff: float = Field(1e-4, gt=0)  # parity tolerance vs PyTorch emissions
    fuse: bool = True
    split_layer_norms: bool = True  # the served graphs' SkipLayerNormalization as plain ops (faster on CPU)
    quantize: bool = True
    int8_blockwise: tuple[str, ...] = ()  # MatMuls made 8-bit block-wise; none: all dynamic (README, ONNX int8)
    int8_block_size: PositiveInt = 128
    int8_embeddings: bool = False
    int8_smooth: float = Field(0.8, ge=0, le=1)
    int8_calibration: PositiveInt = 256
    int8_float: tuple[str, ...] = ()
    int8_avx2: bool = True  # also write model.int8-avx2.onnx for CPUs without VNNI (7-bit weights, no block-wise)
    int8_avx2_float: tuple[str, ...] = ()  # MatMuls left fp32 in that graph
    threads: NonNegativeInt = 0  # ORT intra-op threads for the parity and int8 checks (0: one per physical core)


class PredictRayConfig(BaseModel):
    """``predict.ray``: the Ray engine's actors (README: pre-annotating a large project)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actors: NonNegativeInt = 0  # ONNX Runtime sessions side by side, one per actor (0: as many as the CPUs allow)
    cpus_per_actor: PositiveInt = 1  # Ray CPUs each actor reserves, and its ORT intra-op threads


class PredictConfig(SectionConfig):
    section: ClassVar[str] = "predict"

    tasks: Literal["unlabeled", "all"] = "unlabeled"
    quantized: bool = False
    batch_size: PositiveInt = 32
    threads: NonNegativeInt = 0
    max_tokens: PositiveInt = 512
    model_version: str = ""  # "": derived from the exported model's hash
    uncertainty: Literal["sequence", "min_entity", "entropy"] = "sequence"  # the score Label Studio sorts by
    shard_size: PositiveInt = 10000  # tasks per output file (part-00000.json, ...): the unit of resume
    engine: Literal["local", "ray"] = "local"  # local: this process; ray: Ray Data actors (same shards, byte for byte)
    ray: PredictRayConfig = PredictRayConfig()

    def output_settings(self) -> dict[str, Any]:
        """The settings that shape the shards (the resume key): not the engine, whose output is the same."""
        return self.model_dump(exclude={"engine", "ray"})


class PushConfig(SectionConfig):
    section: ClassVar[str] = "push"

    project: PositiveInt | None = None
    mode: Literal["attach", "import"] = "attach"
    match: Literal["text", "id"] = "text"
    label_map: dict[str, str] = {}
    batch_size: PositiveInt = 100
    max_request_mb: float = Field(100.0, gt=0)  # JSON per request at most (Label Studio refuses 250 MB by default)
    retries: NonNegativeInt = 5
    backoff: float = Field(0.5, ge=0)


class LoopConfig(SectionConfig):
    """The labelling loop inside Label Studio: when the service trains, and what a candidate must beat."""

    section: ClassVar[str] = "loop"

    every_annotations: NonNegativeInt = 0  # new or updated annotations that start a job (0: Start Training only)
    min_gain: float = Field(0.0, ge=0)     # dev F1 points a candidate must gain over the served model (ties keep it)
    max_test_drop: float = Field(1.0, ge=0)  # test F1 points it may lose at most
    repredict: bool = True                 # after a promotion, pre-annotate the unlabeled tasks with the new model
    warm_start: bool = False               # fine-tune the served model's weights instead of the pretrained encoder
    warm_epochs: PositiveInt = 2           # epochs of a warm start
    history: PositiveInt = 20              # finished jobs that /v1/training lists
    nice: int = Field(10, ge=0, le=19)     # CPU priority of the trainer process (higher: gentler on serving)


def number(value: Any) -> int | float | None:
    """A params value as a number: ``5e-5`` (a string to YAML) is a float, ``true`` is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class SearchDim(BaseModel):
    """One tuned ``train`` key: a range (``low``, ``high``, optional ``log`` scale or ``step``) or ``choices``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple[bool | int | float | str, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchDim:
        def bad(message: str) -> PydanticCustomError:
            return PydanticCustomError("search_dim", message)

        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise bad("give either choices or low/high, not both")
            if not self.choices:
                raise bad("choices is empty")
            return self
        if self.low is None or self.high is None:
            raise bad("needs low and high (a range) or choices")
        if self.low > self.high:
            raise bad(f"low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise bad(f"a log scale needs low > 0 (low is {self.low})")
        if self.step is not None and (self.step <= 0 or self.log):
            raise bad("step must be > 0, and a log scale takes no step")
        return self


#: The issue's study: the three rates, warmup, dropout, LSTM size and epochs (README, Tuning).
TUNE_SPACE = {
    "lr_encoder": SearchDim(low=1e-5, high=2e-4, log=True),
    "lr_head": SearchDim(low=2e-4, high=5e-3, log=True),
    "lr_crf": SearchDim(low=1e-3, high=1e-1, log=True),
    "warmup": SearchDim(low=0.0, high=0.3),
    "dropout": SearchDim(low=0.0, high=0.4),
    "lstm_hidden": SearchDim(choices=(128, 256, 384, 512)),
    "epochs": SearchDim(low=3, high=8),
}


class TuneConfig(SectionConfig):
    """``python -m pipeline tune``: an Optuna study whose trials are DVC experiments of the train stage."""

    section: ClassVar[str] = "tune"

    trials: PositiveInt = 24               # trials the study holds when done (a resumed study runs the rest)
    timeout: NonNegativeInt = 0            # seconds of one run after which no new trial starts (0: none)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["hyperband", "median", "none"] = "hyperband"
    jobs: PositiveInt = 2                  # trials at once; with train.threads 0 each trains on cores // jobs threads
    startup_trials: NonNegativeInt = 5     # random trials before TPE models; finished trials before median prunes
    min_epochs: PositiveInt = 1            # epochs every trial runs before the pruner may stop it
    seed: int = 13                         # the sampler's seed (each trial trains with the top-level seed)
    study: str = Field("tune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # also names the experiments: tune-0, ...
    storage: str = "reports/tune.db"       # SQLite file (or an Optuna RDB URL): running again continues the study
    space: dict[str, SearchDim] = Field(default_factory=lambda: dict(TUNE_SPACE))

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TuneConfig:
        """The section, its space checked against the ``train`` section (``dvc exp run -S`` sets only keys there)."""
        config = super().from_params(params)
        train = params.get("train") or {}
        for key, dim in config.space.items():
            where = f"tune.space.{key}"
            if key not in train:
                raise ParamsError(f"{where}: not a key of the train section (known: {sorted(train)})")
            current = number(train[key])
            if dim.choices is None and current is None:
                raise ParamsError(f"{where}: train.{key} is not a number: give choices")
            if dim.choices is None and isinstance(current, int) and not all(
                    float(v).is_integer() for v in (dim.low, dim.high, dim.step or 1)):
                raise ParamsError(f"{where}: train.{key} is an integer: low, high and step must be integers")
            if config.sampler == "grid" and dim.choices is None:
                raise ParamsError(f"{where}: the grid sampler needs choices")
        return config
