"""Typed errors: the CLI prints them without a traceback and exits non-zero.

Each carries the place at fault (task id, field, line) so a user can find it
in a file of thousands of tasks.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for errors caused by input or configuration, not by bugs."""


class ParamsError(PipelineError):
    """A missing or invalid value in ``params.yaml``."""


class ConversionError(PipelineError):
    """An export task (or a CoNLL line) that cannot be converted."""

    def __init__(self, message: str, *, task_id: object = None, field: str | None = None,
                 line: int | None = None) -> None:
        where = []
        if task_id is not None:
            where.append(f"task {task_id}")
        if field is not None:
            where.append(f"field {field!r}")
        if line is not None:
            where.append(f"line {line}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.task_id = task_id
        self.field = field
        self.line = line


class TaskError(ConversionError):
    """One task whose content is broken (a null annotation, offsets outside its text, ...).

    ``convert.bad_tasks: error`` (the default) stops at the first one; ``skip``
    leaves the task out and lists it in the report.
    """


class FileEncodingError(ConversionError):
    """An export or label config file that is not UTF-8 (or gzip-compressed UTF-8)."""


class LabelConfigMismatch(PipelineError):
    """Model labels or region names do not match a Label Studio label config."""


class ModelLoadError(PipelineError):
    """A model folder or pretrained encoder that cannot be loaded."""


class LabelStudioError(PipelineError):
    """Label Studio could not be reached or refused a request."""


class LabelStudioConfigError(LabelStudioError):
    """The connection settings are wrong (a URL without a scheme, a key the server refuses): retrying cannot help."""


class DataError(PipelineError):
    """Training data the configured model cannot learn from (e.g. a tag sequence the scheme forbids)."""
