"""Model scopes: which wafers a model is responsible for, and how its windows close.

A ``ModelSpec`` such as ``yield`` scoped by ``tool`` yields one model per tool
(``yield-ETCH-01``, ``yield-ETCH-02``…). Windows of a scope close after
``window_wafers`` wafers or ``window_minutes``, whichever comes first.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

from fabloop.core.schemas import SensorReading

ScopeField = Literal["fab", "tool", "chamber", "recipe", "step"]


class ModelSpec(BaseModel):
    name: str = Field(default="yield", pattern=r"^[A-Za-z0-9_.-]+$")
    scope_by: list[ScopeField] = Field(default_factory=lambda: list[ScopeField](["tool"]), min_length=1)
    step: str | None = Field(default=None, description="Only readings of this process step (None = all).")
    window_wafers: int = Field(default=200, ge=2)
    window_minutes: float = Field(default=1440.0, gt=0)

    def scope_of(self, reading: SensorReading) -> dict[str, str] | None:
        if self.step is not None and reading.step != self.step:
            return None
        return {field: getattr(reading, field) for field in self.scope_by}

    def model_name(self, scope: dict[str, str]) -> str:
        parts = [self.name, *(scope[f] for f in self.scope_by)]
        return "-".join(re.sub(r"[^A-Za-z0-9_.-]", "_", p) for p in parts)


class ModelCatalogValue(BaseModel):
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec()])

    def spec(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(f"no model spec named {name!r} (known: {[s.name for s in self.models]})")
