"""Media pricing as pure functions: the price of images (per image, by size and quality) and of video (per
second, by size), the hold a request takes and the charge for what was delivered.

Prices come from the model's catalog entry in integer micros, so every amount here is an exact integer
product: no rounding is involved. A size, quality or duration the entry does not list is refused with
`MediaPriceError` naming the allowed values; nothing is ever priced at a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass

from billing.catalog_config import ImageModelConfig, VideoModelConfig
from billing.errors import BillingError
from billing.money import check_range
from billing.pricing import Component, Estimate

MAX_IMAGES = 10  # OpenAI's limit for `n`


class MediaPriceError(BillingError):
    """A media request the price table cannot price; `param` names the offending field."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


def _allowed(param: str, value: object, allowed: list[str] | list[int], model: str) -> MediaPriceError:
    listed = ", ".join(str(a) for a in allowed)
    return MediaPriceError(f"{param} {value!r} is not offered for model {model}; allowed values: {listed}",
                           param=param)


@dataclass(frozen=True, slots=True)
class ImageQuote:
    """The price of `n` images of one size and quality. `hold_micros` is what the request holds."""

    size: str
    quality: str
    n: int
    unit_micros: int

    @property
    def hold_micros(self) -> int:
        return check_range(self.n * self.unit_micros)

    def charge_micros(self, returned: int) -> int:
        """The charge for the images actually returned: never more than were asked for (and held)."""
        return min(max(returned, 0), self.n) * self.unit_micros

    def estimate(self) -> Estimate:
        return Estimate(self.hold_micros, (
            Component("output", "image", self.n, self.n, self.unit_micros, self.hold_micros,
                      unit_field="unit_price_micros"),
        ))


def image_quote(entry: ImageModelConfig, *, model: str, size: str | None, quality: str | None,
                n: int) -> ImageQuote:
    """Price `n` images. An omitted size or quality takes the entry's default (or its first listed value)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise MediaPriceError(f"n must be an integer from 1 to {MAX_IMAGES}", param="n")
    size = size if size is not None else (entry.default_size or entry.sizes[0])
    quality = quality if quality is not None else (entry.default_quality or entry.qualities[0])
    if size not in entry.sizes:
        raise _allowed("size", size, entry.sizes, model)
    if quality not in entry.qualities:
        raise _allowed("quality", quality, entry.qualities, model)
    unit = entry.prices.get(f"{size}/{quality}", entry.prices.get(size, entry.per_image_micros))
    return ImageQuote(size=size, quality=quality, n=n, unit_micros=unit)


@dataclass(frozen=True, slots=True)
class VideoQuote:
    """The price of one video: `seconds` times the per-second price of its size (held whole)."""

    size: str
    seconds: int
    per_second_micros: int

    @property
    def hold_micros(self) -> int:
        return check_range(self.seconds * self.per_second_micros)

    def estimate(self) -> Estimate:
        return Estimate(self.hold_micros, (
            Component("output", "second", self.seconds, self.seconds, self.per_second_micros,
                      self.hold_micros, unit_field="unit_price_micros"),
        ))


def parse_seconds(value: object) -> int | None:
    """OpenAI sends `seconds` as a string ("4"); accept that or a JSON integer. None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def video_quote(entry: VideoModelConfig, *, model: str, size: str | None, seconds: object) -> VideoQuote:
    """Price one video. An omitted size or duration takes the entry's default (or its first listed value)."""
    size = size if size is not None else (entry.default_size or entry.sizes[0])
    if size not in entry.sizes:
        raise _allowed("size", size, entry.sizes, model)
    if seconds is None:
        parsed: int | None = entry.default_seconds or entry.seconds[0]
    else:
        parsed = parse_seconds(seconds)
    if parsed is None or parsed not in entry.seconds:
        raise _allowed("seconds", seconds, entry.seconds, model)
    per_second = entry.prices.get(size, entry.per_second_micros)
    return VideoQuote(size=size, seconds=parsed, per_second_micros=per_second)
