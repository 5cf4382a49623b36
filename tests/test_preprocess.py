"""Decoding and preprocessing, checked pixel by pixel against the presets' definitions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, SAMPLE_1000, VAL_1300, jpeg_bytes, need
from pipeline.config import ConfigError, load_preset
from pipeline.preprocess import (ImageError, Preprocessor, crop_origin, decode_image, decode_with_pillow,
                                 preprocess_image, resize_and_crop, resize_pixels, scaled_size)
from pipeline.sources.base import NO_LABEL


def test_caffe2_preset_is_the_model_card():
    preset = load_preset("caffe2")
    assert preset.channel_order == "BGR"
    assert np.allclose(preset.mean, np.array([0.406, 0.456, 0.485]) * 255)
    assert np.allclose(preset.std, np.array([0.225, 0.224, 0.229]) * 255)
    assert (preset.interpolation, preset.scale, preset.crop, preset.crop_offset) == ("area", 256, 224, "floor")


def test_unknown_preset_and_bad_yaml_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no preset 'nope'.*caffe2"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nchannel_order: RGB\n")
    with pytest.raises(ConfigError, match="missing keys"):
        load_preset(str(bad))


@pytest.mark.parametrize("key,value,message", [
    ("mean", "123", r"mean must be a list of three numbers \(one per channel\), got 123"),
    ("std", "[a, b, c]", r"std must be a list of three numbers \(one per channel\), got \['a', 'b', 'c'\]"),
    ("mean", "[[1, 2], 3, 4]", "mean must be a list of three numbers"),
    ("std", "[1, 0, 1]", r"std must be > 0, got \[1.0, 0.0, 1.0\]"),
    ("mean", "[.nan, 116.28, 103.53]", r"mean must be finite numbers \(not .nan or .inf\), got \[nan, 116.28, 103.5"),
    ("std", "[58.395, .inf, 57.375]", r"std must be finite numbers \(not .nan or .inf\), got \[58.395, inf, 57.375\]"),
    ("std", "[-.inf, 57.12, 57.375]", r"std must be finite numbers"),
    ("mean", "[1.0e+400, 116.28, 103.53]", r"mean must be finite numbers"),  # YAML reads it as inf
    ("mean", f"[{10 ** 400}, 116.28, 103.53]", r"mean must be finite numbers"),  # float() overflows
    ("scale", "big", "scale must be a whole number of pixels from 1 to 16384, got 'big'"),
    ("scale", "1000000000000", "scale must be a whole number of pixels from 1 to 16384"),
    ("crop", "224.5", "crop must be a whole number of pixels from 1 to 16384, got 224.5"),
])
def test_a_preset_value_of_the_wrong_kind_is_named(tmp_path, key, value, message):
    """Each of these failed with a bare TypeError or ValueError, or (a huge scale) inside Ray."""
    text = "".join(f"{line.split(':')[0]}: {value}\n" if line.startswith(f"{key}:") else line + "\n"
                   for line in (REPO / "conf" / "torch.yaml").read_text().splitlines())
    (tmp_path / "preset.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_preset(str(tmp_path / "preset.yaml"))
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not a valid YAML text file"):
        load_preset(str(tmp_path / "binary.yaml"))


def test_shorter_side_scaled_longer_side_truncated():
    assert scaled_size(500, 375, 256) == (341, 256)  # int(500 * 256 / 375) = 341
    assert scaled_size(375, 500, 256) == (256, 341)
    assert scaled_size(227, 227, 256) == (256, 256)


def test_crop_offsets_floor_and_round():
    assert crop_origin(227, 224, "floor") == 1
    assert crop_origin(227, 224, "round") == 2  # round(1.5) = 2
    assert crop_origin(341, 224, "floor") == 58


def test_channel_order_and_normalisation():
    red = np.zeros((260, 300, 3), np.uint8)
    red[..., 0] = 255
    caffe2 = preprocess_image(red, load_preset("caffe2"))
    torch = preprocess_image(red, load_preset("torch"))
    assert caffe2.shape == torch.shape == (3, 224, 224)
    # caffe2 is BGR: channel 2 is red
    assert np.allclose(caffe2[2], (255 - 0.485 * 255) / (0.229 * 255), atol=1e-5)
    assert np.allclose(caffe2[0], (0 - 0.406 * 255) / (0.225 * 255), atol=1e-5)
    # torch is RGB: channel 0 is red
    assert np.allclose(torch[0], (255 - 0.485 * 255) / (0.229 * 255), atol=1e-5)
    tf = preprocess_image(red, load_preset("tf127"))
    assert np.allclose(tf[0], (255 - 127) / 128) and np.allclose(tf[1], -127 / 128)


def test_area_interpolation_averages_blocks():
    preset = load_preset("caffe2")
    values = (np.arange(256 * 256).reshape(256, 256) % 251).astype(np.uint8)
    blocks = np.kron(values, np.ones((2, 2), np.uint8))
    pixels = np.stack([blocks] * 3, axis=-1)  # 512x512 of 2x2 blocks
    crop = resize_and_crop(pixels, preset)
    expected = values[16:240, 16:240]
    assert np.array_equal(crop[:, :, 0], expected)


def test_area_interpolation_weights_partly_covered_pixels_as_opencv_does():
    # 3 -> 2 pixels: each output pixel covers 1.5 source pixels, the middle one half each. OpenCV's
    # INTER_AREA (Caffe2) gives (0 + 90/2) / 1.5 = 30 and (90/2 + 180) / 1.5 = 150; a box filter
    # that counts whole pixels (Pillow's) would give 45 and 135.
    row = np.array([[0, 90, 180]], np.uint8)
    pixels = np.repeat(np.repeat(row[:, :, None], 3, axis=2), 2, axis=0)  # 2 rows, 3 columns, RGB
    assert resize_pixels(pixels, (2, 2), "area")[0, :, 0].tolist() == [30, 150]


def test_jpeg_fast_path_gives_pillows_pixels():
    """JPEGs are decoded by simplejpeg, everything else by Pillow: the pixels must be the same."""
    files = sorted(need(SAMPLE_1000).glob("*.JPEG"))[::10] + sorted(need(VAL_1300).glob("*.JPEG"))[::20]
    greyscale = 0
    for path in files:
        data = path.read_bytes()
        pixels = decode_image(data)
        assert np.array_equal(pixels, decode_with_pillow(data)), path.name
        greyscale += bool(Image.open(io.BytesIO(data)).mode == "L")
    assert len(files) > 150 and greyscale  # full-size photos, pre-resized ones and greyscale JPEGs


def test_jpegs_over_pillows_pixel_limit_are_refused_unless_it_is_switched_off(monkeypatch):
    data = jpeg_bytes(size=(200, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 100 // 2)
    with pytest.raises(ImageError, match="too large to decode safely"):
        decode_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # how users allow huge images in Pillow
    assert decode_image(data).shape == (100, 200, 3)


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("RGB", "PNG")])
def test_every_image_mode_becomes_three_channels(mode, fmt):
    pixels = decode_image(jpeg_bytes(mode=mode, fmt=fmt))
    assert pixels.dtype == np.uint8 and pixels.shape == (48, 64, 3)
    assert preprocess_image(pixels, load_preset("torch")).shape == (3, 224, 224)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    pixels = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    decoded = decode_image(buffer.getvalue())
    assert decoded.max() == 255 and decoded.min() == 0


@pytest.mark.parametrize("data,reason", [
    (b"", "empty image"),
    (b"this is a text file, not a picture", "not a recognised image format"),
    (jpeg_bytes(size=(200, 200))[:300], "truncated or corrupt"),
])
def test_bad_bytes_give_specific_reasons(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_preprocessor_turns_bad_rows_into_error_rows():
    good = jpeg_bytes(seed=1)
    batch = {
        "key": np.array(["ok", "empty", "nolabel", "range", "unread"], dtype=object),
        "label": np.array([3, 4, NO_LABEL, 1000, 5]),
        "image": np.array([good, b"", good, good, b""], dtype=object),
        "error": np.array(["", "", "", "", "file not found"], dtype=object),
    }
    out = Preprocessor(load_preset("torch")).preprocess(batch)
    assert list(out["error"]) == ["", "empty image (0 bytes)", "no label for this image",
                                  "label 1000 out of range 0..999", "file not found"]
    assert out["crop"].shape == (5, 224, 224, 3) and out["crop"].dtype == np.uint8
    assert out["crop"][0].any() and not out["crop"][1:].any()
    # labelling needs no labels
    unlabelled = Preprocessor(load_preset("torch"), require_label=False).preprocess(batch)
    assert unlabelled["error"][2] == ""


def test_a_whole_block_is_preprocessed_in_chunks_in_order():
    """Ray Data hands the Preprocessor whole read blocks; it yields bounded chunks, every row once."""
    from pipeline.preprocess import PREPROCESS_CHUNK

    n = 2 * PREPROCESS_CHUNK + 6
    block = {
        "key": np.array([f"{i}.jpg" for i in range(n)], dtype=object),
        "label": np.arange(n) % 1000,
        "image": np.array([jpeg_bytes(seed=i % 3, size=(40, 30)) for i in range(n)], dtype=object),
        "error": np.array([""] * n, dtype=object),
    }
    chunks = list(Preprocessor(load_preset("torch"))(block))
    assert [len(c["key"]) for c in chunks] == [PREPROCESS_CHUNK, PREPROCESS_CHUNK, 6]
    assert [k for c in chunks for k in c["key"]] == list(block["key"])
    assert all(c["crop"].shape[1:] == (224, 224, 3) and not (c["error"] != "").any() for c in chunks)
