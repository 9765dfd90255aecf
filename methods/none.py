"""The unedited base model: the reference row of every table and every paired test."""

from __future__ import annotations

from typing import Any

from fia_bench.api import EraseRequest, Method


class NoEdit(Method):
    def erase(self, request: EraseRequest) -> dict[str, Any]:
        return {}
