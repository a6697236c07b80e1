"""Media prices: per image by size and quality, per second by size; unknown values are refused, never defaulted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.catalog_config import ImageModelConfig, VideoModelConfig
from billing.media_pricing import MAX_IMAGES, MediaPriceError, image_quote, parse_seconds, video_quote

IMAGE = ImageModelConfig(
    modality="image", per_image_micros=40_000, sizes=["1024x1024", "2048x2048"], qualities=["standard", "hd"],
    prices={"2048x2048": 90_000, "2048x2048/hd": 120_000},
)
VIDEO = VideoModelConfig(
    modality="video", per_second_micros=100_000, sizes=["720x1280", "1792x1024"], seconds=[4, 8, 12],
    prices={"1792x1024": 300_000},
)


@pytest.mark.parametrize(
    ("size", "quality", "unit"),
    [
        ("1024x1024", "standard", 40_000),  # no entry: the default price
        ("1024x1024", "hd", 40_000),
        ("2048x2048", "standard", 90_000),  # by size
        ("2048x2048", "hd", 120_000),  # by size and quality, which wins over size alone
        (None, None, 40_000),  # omitted: the first listed size and quality
    ],
    ids=["default", "default-hd", "by-size", "by-size-and-quality", "omitted"],
)
def test_image_unit_price_by_size_and_quality(size: str | None, quality: str | None, unit: int) -> None:
    quote = image_quote(IMAGE, model="m", size=size, quality=quality, n=3)
    assert quote.unit_micros == unit
    assert quote.hold_micros == 3 * unit
    estimate = quote.estimate()
    assert estimate.total_micros == quote.hold_micros
    assert estimate.components[0].as_dict() == {
        "type": "output", "metric": "image", "quantity": 3, "billable_quantity": 3,
        "unit_price_micros": unit, "total_cost_micros": 3 * unit,
    }


def test_image_defaults_named_by_the_entry_win() -> None:
    entry = IMAGE.model_copy(update={"default_size": "2048x2048", "default_quality": "hd"})
    quote = image_quote(entry, model="m", size=None, quality=None, n=1)
    assert (quote.size, quote.quality, quote.unit_micros) == ("2048x2048", "hd", 120_000)


@pytest.mark.parametrize(
    ("size", "quality", "n", "param", "words"),
    [
        ("999x999", "standard", 1, "size", "allowed values: 1024x1024, 2048x2048"),
        ("1024x1024", "ultra", 1, "quality", "allowed values: standard, hd"),
        ("1024x1024", "standard", 0, "n", "from 1 to 10"),
        ("1024x1024", "standard", MAX_IMAGES + 1, "n", "from 1 to 10"),
    ],
    ids=["unknown-size", "unknown-quality", "zero-images", "too-many-images"],
)
def test_image_refuses_what_the_table_does_not_price(size: str, quality: str, n: int, param: str,
                                                     words: str) -> None:
    with pytest.raises(MediaPriceError) as caught:
        image_quote(IMAGE, model="m", size=size, quality=quality, n=n)
    assert caught.value.param == param
    assert words in str(caught.value)


@given(n=st.integers(1, MAX_IMAGES), returned=st.integers(-2, 2 * MAX_IMAGES))
def test_image_charge_is_returned_images_times_unit_never_above_the_hold(n: int, returned: int) -> None:
    quote = image_quote(IMAGE, model="m", size="2048x2048", quality="hd", n=n)
    charge = quote.charge_micros(returned)
    assert charge == min(max(returned, 0), n) * 120_000
    assert 0 <= charge <= quote.hold_micros


@pytest.mark.parametrize(
    ("size", "seconds", "total"),
    [
        ("720x1280", "4", 400_000),
        ("720x1280", 12, 1_200_000),
        ("1792x1024", "8", 2_400_000),
        (None, None, 400_000),
    ],
    ids=["string-seconds", "int-seconds", "priced-size", "omitted"],
)
def test_video_price_is_seconds_times_per_second_price_of_the_size(size: str | None, seconds: object,
                                                                   total: int) -> None:
    quote = video_quote(VIDEO, model="v", size=size, seconds=seconds)
    assert quote.hold_micros == total
    line = quote.estimate().components[0].as_dict()
    assert (line["metric"], line["quantity"], line["total_cost_micros"]) == ("second", quote.seconds, total)
    assert line["unit_price_micros"] * line["quantity"] == total


@pytest.mark.parametrize(
    ("size", "seconds", "param"),
    [("640x480", "4", "size"), ("720x1280", "5", "seconds"), ("720x1280", "four", "seconds"),
     ("720x1280", True, "seconds"), ("720x1280", 4.0, "seconds")],
    ids=["unknown-size", "unlisted-seconds", "text-seconds", "bool-seconds", "float-seconds"],
)
def test_video_refuses_unknown_size_or_duration(size: str, seconds: object, param: str) -> None:
    with pytest.raises(MediaPriceError) as caught:
        video_quote(VIDEO, model="v", size=size, seconds=seconds)
    assert caught.value.param == param
    assert "allowed values" in str(caught.value)


def test_parse_seconds() -> None:
    assert [parse_seconds(v) for v in ("8", " 12 ", 4, "-4", "4.0", None, False)] == [8, 12, 4, None, None, None,
                                                                                      None]
