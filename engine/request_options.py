"""Per-request engine choices beyond sampling: attention mode and LoFiT adapter."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestOptions:
    attention: str | None = None  # None: the server's mode
    lofit: str | None = None  # name of a loaded LoFiT adapter
