"""Errors nibble raises on bad input. Each carries a one-line message that names the problem."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class NibbleError(Exception):
    """Base class: the CLI prints these as a single line and exits with status 2."""


class ModelNotFoundError(NibbleError):
    """A model spec names no file, folder, built-in name or reachable hub id."""


class UnsupportedArchitectureError(NibbleError):
    """The model has no list of decoder blocks nibble can walk through."""


class CheckpointError(NibbleError):
    """A nibble checkpoint is missing, incomplete, truncated or corrupt."""


class OutputExistsError(NibbleError):
    """The output folder already holds files and no resume was asked for."""


class NonFiniteError(NibbleError):
    """NaN or Inf found in weights or activations."""


class DatasetError(NibbleError):
    """A dataset name or file could not be resolved or read."""


class ConfigError(NibbleError):
    """A quantization or training configuration is invalid."""
