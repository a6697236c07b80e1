"""Priced model entries as they are configured (TOML `[models."id"]`), one type per modality.

Prices are integer micros: per million tokens for text, per image for images, per second for video. Entries are
told apart by `modality` (default "text"). Each type can describe its own prices for `GET models`.

Any entry can be an alias (`upstream_model`): its own id, prices and limits, forwarded under the upstream's id.

Any entry can instead list `providers` (issue 15): several upstreams that serve it, each under its own model id and
at the operator's own cost price (the same units as the model's prices; what the margin report counts when the
provider reports no cost of its own). The customer pays the model's price whichever provider serves the call.
Providers are tried by `priority` (lower first; among equals, in proportion to `weight`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from billing.money import MAX_MICROS

Price = Annotated[int, Field(ge=0, le=MAX_MICROS, strict=True)]


class _Provider(BaseModel):
    """One upstream that serves a model: the upstream's name, the provider's own model id, its cost price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upstream: str = Field(min_length=1)
    model: str = Field(min_length=1, description="the provider's own id for the model (sent upstream)")
    # The name a request's `provider.order` and the X-Meterline-Provider header use: the upstream's, by default.
    name: str | None = Field(default=None, min_length=1, max_length=100)
    priority: int = Field(default=1, ge=0, le=1_000_000)
    weight: int = Field(default=1, ge=1, le=1_000_000)

    @property
    def provider_name(self) -> str:
        return self.name or self.upstream


class TextProviderConfig(_Provider):
    input_cost_per_mtok_micros: Price
    output_cost_per_mtok_micros: Price
    cached_input_cost_per_mtok_micros: Price | None = None


class ImageProviderConfig(_Provider):
    per_image_cost_micros: Price


class VideoProviderConfig(_Provider):
    per_second_cost_micros: Price


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    upstream: str | None = Field(default=None, description="Upstream name; default: openrouter (text), media")
    # The upstream's id for the model when this entry's id is an alias of it: the call is forwarded under it, and
    # priced, limited, listed and recorded under the entry's own id.
    upstream_model: str | None = Field(default=None, min_length=1)
    display_name: str | None = None

    @model_validator(mode="after")
    def _providers_stand_alone(self) -> _Entry:
        providers = getattr(self, "providers", None)
        if providers is None:
            return self
        if self.upstream is not None or self.upstream_model is not None:
            raise ValueError("give either providers or upstream/upstream_model, not both: each provider names "
                             "its upstream and model")
        names = [provider.provider_name for provider in providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique within a model (two providers on one upstream need "
                             "a `name` each)")
        return self


class TextModelConfig(_Entry):
    modality: Literal["text"] = "text"
    input_per_mtok_micros: Price
    output_per_mtok_micros: Price
    cached_input_per_mtok_micros: Price | None = None
    context_length: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    # The name the upstream reads the output limit under for this model: None sends the client's own choice
    # (max_tokens unless it used max_completion_tokens); OpenAI's reasoning models want max_completion_tokens.
    output_limit_field: Literal["max_tokens", "max_completion_tokens"] | None = None
    providers: list[TextProviderConfig] | None = Field(default=None, min_length=1)

    def pricing(self) -> dict[str, Any]:
        return {
            "input_per_mtok_micros": self.input_per_mtok_micros,
            "output_per_mtok_micros": self.output_per_mtok_micros,
            "cached_input_per_mtok_micros": self.cached_input_per_mtok_micros,
        }


class ImageModelConfig(_Entry):
    """Price per image: `prices` keys are "SIZE/QUALITY" or "SIZE"; anything else allowed costs
    `per_image_micros`. Only the listed sizes and qualities are accepted."""

    modality: Literal["image"]
    per_image_micros: Price
    sizes: list[str] = Field(min_length=1)
    qualities: list[str] = Field(default_factory=lambda: ["standard"], min_length=1)
    prices: dict[str, Price] = Field(default_factory=dict)
    default_size: str | None = None
    default_quality: str | None = None
    providers: list[ImageProviderConfig] | None = Field(default=None, min_length=1)

    def pricing(self) -> dict[str, Any]:
        return {"per_image_micros": self.per_image_micros, "sizes": self.sizes,
                "qualities": self.qualities, "prices": self.prices}


class VideoModelConfig(_Entry):
    """Price per second of video, by size (`prices` keyed by size, else `per_second_micros`)."""

    modality: Literal["video"]
    per_second_micros: Price
    sizes: list[str] = Field(min_length=1)
    prices: dict[str, Price] = Field(default_factory=dict)
    seconds: list[int] = Field(default_factory=lambda: [4, 8, 12], min_length=1)
    default_size: str | None = None
    default_seconds: int | None = None
    providers: list[VideoProviderConfig] | None = Field(default=None, min_length=1)

    def pricing(self) -> dict[str, Any]:
        return {"per_second_micros": self.per_second_micros, "sizes": self.sizes,
                "seconds": self.seconds, "prices": self.prices}


ModelConfig = Annotated[
    TextModelConfig | ImageModelConfig | VideoModelConfig, Field(discriminator="modality")
]
