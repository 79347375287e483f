"""User-facing error types. Each message names the problem and the fix; the CLI prints them as
one line and exits with status 2."""


class RSQError(Exception):
    """Base class for errors caused by user input (bad options, files, models, data)."""


class ConfigError(RSQError, ValueError):
    """An option or a combination of options is invalid."""


class UnsupportedModelError(RSQError):
    """The model's architecture is not one rsq knows how to quantize."""


class CheckpointFormatError(RSQError):
    """A checkpoint on disk is missing, corrupt, truncated or does not match its config."""


class CalibrationError(RSQError):
    """Calibration text or activations are unusable (too short, empty, NaN/Inf)."""


class SingularHessianError(RSQError):
    """The GPTQ Hessian stayed non positive-definite after the bounded damping retries."""


class NoHadamardError(RSQError, ValueError):
    """No Hadamard matrix of the requested order is known (or none can exist)."""


class ExportError(RSQError):
    """The checkpoint holds something the target format cannot express."""


class NonFiniteError(RSQError):
    """A result (perplexity, loss) came out NaN or infinite; the message names the stage and the likely cause."""


class MemoryBudgetError(RSQError):
    """The job's predicted peak host memory exceeds what the machine has available."""


class HubError(RSQError):
    """The Hugging Face hub could not be reached or refused an upload."""


class MissingDependencyError(RSQError, ImportError):
    """An optional package a command needs is missing or too old."""
