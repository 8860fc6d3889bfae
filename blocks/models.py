"""Which models fabloop maintains, and how their windows close, as a Prefect Block."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from fabloop.core.scopes import ModelCatalogValue, ModelSpec


class ModelCatalog(Block):
    """The model families and their scopes (e.g. a ``yield`` model per tool)."""

    _block_type_name = "fabloop model catalog"
    _block_type_slug = "fabloop-model-catalog"
    _description = "Model families, the event fields that scope them, and when their windows close."

    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec()])

    def value(self) -> ModelCatalogValue:
        return ModelCatalogValue(models=self.models)
