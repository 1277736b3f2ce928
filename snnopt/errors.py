"""Exception types raised by snnopt.

Every error a user can cause derives from :class:`SnnoptError`. Argument errors also derive from
the built-in ``ValueError`` / ``TypeError`` so that code written against plain PyTorch conventions
(``except ValueError``) keeps working.
"""


class SnnoptError(Exception):
    """Base class of every exception snnopt raises on purpose."""


class InvalidArgumentError(SnnoptError, ValueError):
    """An argument has the right type but a wrong value, shape, device or option."""


class InvalidTypeError(SnnoptError, TypeError):
    """An argument has the wrong type or dtype."""


class UnsupportedModelError(SnnoptError):
    """``optimize(..., strict=True)`` had to leave part of the model as it was; the message says why."""


class ModelTraceError(SnnoptError):
    """The model could not be run or traced on the example inputs (the message carries the cause)."""
