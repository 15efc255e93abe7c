"""`full`: no eviction, through the same cache and attention path as every other method."""
from __future__ import annotations

from .base import Method
from .registry import register


@register
class Full(Method):
    name = "full"

    def layer_budgets(self, preferences, caps, is_last, indicators=None):
        return caps

    @property
    def compresses(self) -> bool:
        return False
