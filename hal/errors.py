"""Every failure a caller can cause is a :class:`HalError` subclass.

Messages name the bad thing, what was expected and what to do. Where an error means the same as a
built-in exception it subclasses that too, so ``except KeyError`` keeps working for callers who
do not know about the HAL.
"""

from __future__ import annotations

__all__ = [
    "CompileError",
    "DeviceError",
    "FailoverError",
    "HalError",
    "InputError",
    "LoweringError",
    "ModelError",
    "OutputPathError",
    "PluginError",
    "RunError",
    "SettingError",
    "UnavailableDeviceError",
    "UnknownDeviceError",
    "VerificationError",
    "first_line",
]


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (runtimes' errors run to pages), or its type's name
    when the message is empty: what the HAL quotes of another library's error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class HalError(Exception):
    """Base class of every error the HAL raises on purpose."""


class ModelError(HalError, ValueError):
    """A model file or object cannot be used: unreadable, invalid, unsafe or too large."""


class OutputPathError(HalError, OSError):
    """A path the HAL was asked to write cannot take the file: a directory, a missing or read-only
    directory, a special file system such as /proc. The message names the path."""


class InputError(HalError, ValueError):
    """Feeds passed to :meth:`Executable.run` do not match the model's inputs."""


class DeviceError(HalError):
    """A device cannot be used for what was asked."""


class UnknownDeviceError(DeviceError, KeyError):
    """No registered device has the requested id."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0]) if self.args else ""


class UnavailableDeviceError(DeviceError):
    """The device is registered but cannot run anything here (no driver, no toolkit, ...)."""


class SettingError(HalError, ValueError):
    """A setting the HAL reads (an environment variable such as ``HAL_DISCOVERY_TIMEOUT``) has a
    value it cannot use; the message names the variable and what it takes."""


class PluginError(HalError):
    """A plugin broke its contract: it failed to import, raised, or registered nonsense."""


class CompileError(HalError):
    """A backend could not compile a model for a device.

    ``operators`` names the operators the backend refused, where it said so.
    """

    def __init__(self, message: str, operators: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.operators = tuple(operators)


class LoweringError(CompileError):
    """A model cannot be lowered for a device without a fallback the caller forbade."""


class VerificationError(CompileError):
    """A device ran the model but its answers differ from the reference's beyond the tolerance.

    ``report`` is the :class:`hal.verification.VerificationReport`: every output's max absolute and
    relative error and the tolerance it was held to. A subclass of :class:`CompileError`, so
    ``auto``, device lists and fallback move on to the next device.
    """

    report = None


class RunError(HalError, RuntimeError):
    """The backend failed while running a model on checked inputs; the message has its reason."""


class FailoverError(RunError):
    """A :class:`hal.Pool` could not answer a request: every device failed it, was skipped by its
    open circuit breaker, or the caller's deadline passed. ``failures`` holds ``(device id,
    reason)`` for each device, in the pool's order; the message names them all."""

    failures: tuple[tuple[str, str], ...] = ()
