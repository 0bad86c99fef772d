"""The service's answer encoders: our PNG writer round-trips exactly, and other modes go through Pillow."""
import io

import numpy as np
import pytest
from PIL import Image

from engine.serving.encoders import encode_image, encode_png


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (64, 48)])
def test_encode_png_round_trips_exactly(mode, size):
    rng = np.random.default_rng(0)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    array = array[:, :, 0] if mode == "L" else array
    data = encode_png(Image.fromarray(array, mode=mode))
    decoded = Image.open(io.BytesIO(data))
    decoded.load()  # Pillow checks every chunk's CRC and the zlib stream here
    assert (decoded.format, decoded.mode, decoded.size) == ("PNG", mode, size)
    np.testing.assert_array_equal(np.asarray(decoded), array)


def test_png_answers_are_written_by_encode_png_and_other_modes_by_pillow():
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    assert encode_image(image, "png") == encode_png(image)
    palette = image.convert("P")
    decoded = Image.open(io.BytesIO(encode_png(palette)))
    assert decoded.mode == "P"
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), np.asarray(palette.convert("RGB")))
