"""The engine's exceptions: the CLI prints each of bad input, numerics, export and compile as a single line and
exits non-zero."""


class InputError(ValueError):
    """A problem with what the user gave us (an image, a model, an option), stated in one line."""


class NumericalError(RuntimeError):
    """The networks produced NaN or Inf even after the float32 fallback."""


class ExportError(RuntimeError):
    """A component failed to export or to verify; the message names it."""


class CompileError(RuntimeError):
    """torch.compile or a CUDA graph capture could not take a network at an input shape; the message names the
    setting to turn off (nothing falls back to a slower path in silence)."""


class Cancelled(RuntimeError):
    """Raised by a step callback to stop an edit at the next step (a cancelled or timed-out request)."""


ONE_LINE_ERRORS = (InputError, NumericalError, ExportError, CompileError)  # the CLI prints these as one line


def quote_error(err: BaseException) -> str:
    """An exception from another library as "Type: its first non-empty line" (the type alone where it has no
    message), on one line, for a message that quotes it: such errors add lines of context and advice."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return one_line(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__)


def one_line(text: object, limit: int = 200) -> str:
    """``str(text)`` on one line and at most ``limit`` characters: for messages and logs that quote what a
    client sent."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
