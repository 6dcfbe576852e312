"""Per-request engine choices beyond sampling: attention mode, LoFiT adapter, bias correction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestOptions:
    attention: str | None = None  # None: the server's mode
    lofit: str | None = None  # name of a loaded LoFiT adapter
    bias_correction: str | None = None  # "anchored", "prior", or "<mode>:<profile>"
