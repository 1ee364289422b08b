"""The runtime's typed errors: the bottom layer (no import of numpy, torch or any other larp_rt module).

A row that cannot be sampled raises a ``SamplingError`` (a ``ValueError``, so ``except ValueError`` and the
messages users and tests match keep working): ``NonFiniteLogitsError`` for NaN/Inf logits (the model's fault),
``SamplingParamsError`` for per-row parameters a sampler refuses. Code that must tell them apart (the generation
loop's failure isolation, servers' status codes) tests the type, never the message. ``row`` names the first bad
row of the refused batch when the raiser knows it.

Messages that come from outside Python (the C++ kernels' ``larp_last_error``, the ONNX Runtime custom op) are
typed once, where they cross into Python, by ``kernel_error``.

A backend that lacks an optional computation raises ``BackendCapabilityError`` (a ``NotImplementedError``) naming
the backend and the one that has it.
"""

from __future__ import annotations

import re

__all__ = ["SamplingError", "NonFiniteLogitsError", "SamplingParamsError", "BackendCapabilityError",
           "kernel_error", "NON_FINITE_TEXT"]

# every non-finite-logits message says this (the numpy and torch references, the C++ kernels, the device codes)
NON_FINITE_TEXT = "NaN/Inf"


class SamplingError(ValueError):
    """A sampler refused (a row of) its batch. ``row``: the first refused row of that batch, when known."""

    def __init__(self, message: str, *, row: int | None = None):
        super().__init__(message)
        self.row = row

    def __reduce__(self):  # pickling keeps the row (Exception's default pickles args only)
        return _rebuild, (type(self), str(self), self.row)


def _rebuild(cls: type, message: str, row: int | None) -> SamplingError:
    return cls(message, row=row)


class NonFiniteLogitsError(SamplingError):
    """The logits (or the guided mix of them) hold NaN/Inf: the model produced non-finite values."""


class SamplingParamsError(SamplingError):
    """A per-row sampling parameter is outside the bounds every sampler enforces (``SamplingParams.validate``)."""


class BackendCapabilityError(NotImplementedError):
    """This backend cannot run the asked computation (e.g. the stochastic SVQ encoder); the message names one
    that can."""


# a kernel's refusal names its row: "... (first at row 3, token 7) ..." (logits) or "temperature[3] = nan: ..."
_ROW_IN_MESSAGE = re.compile(r"(?:first at row (\d+)\b)|(?:^(?:larp_rt\.Sample: )?[a-z_]+\[(\d+)\] = )")


def message_row(message: str) -> int | None:
    """The row a kernel's refusal names ("... (first at row 3, ...)", "temperature[3] = nan: ..."), if any."""
    m = _ROW_IN_MESSAGE.search(message)
    return None if m is None else int(m.group(1) or m.group(2))


def kernel_error(message: str) -> ValueError:
    """The typed error of a refusal message that crossed from C++ (a kernel's ``larp_last_error``, the ONNX Runtime
    Sample op's exception): ``NonFiniteLogitsError`` for non-finite logits, ``SamplingParamsError`` for a parameter
    ("name[row] = value: must be ..."), else a plain ValueError; ``row`` parsed from the message. The one place
    where a message's text decides a type: the C ABI returns text, not a type."""
    row = message_row(message)
    if NON_FINITE_TEXT in message:
        return NonFiniteLogitsError(message, row=row)
    if re.search(r"^(?:larp_rt\.Sample: )?[a-z_]+\[\d+\] = ", message):
        return SamplingParamsError(message, row=row)
    return ValueError(message)
