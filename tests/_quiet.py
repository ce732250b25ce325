"""``quiet(fn, ...)``: a call with Hutchinson's negative-trace warnings hidden.

Random-init and briefly trained test models have indefinite Hessians, so a few probes often give
negative traces; the tests that do not check that warning call through here.
"""

from __future__ import annotations

from typing import Any
import warnings


def quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the negative-trace warnings hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trace of layer.*is negative")
        return fn(*args, **kwargs)
