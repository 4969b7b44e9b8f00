"""raster: TIFFs read band by band give exactly OpenCV's pixels; `shrink` is the block mean it says it is (checked
with numpy reshapes) and the same from a TIFF's bands as from the decoded array."""

import cv2
import numpy as np
import pytest
import tifffile

from cvtk_job import raster


def _image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[height // 3:height // 2, width // 4:width // 2] = (10, 200, 90)  # some structure, not only noise
    return image


def _writers():
    """(name, write(path, bgr)) for the TIFF layouts users have: OpenCV's (LZW strips of one row), tiled and
    deflate (GDAL/QGIS mosaics), stripped uncompressed, zstd tiles, and grey."""
    return [
        ("opencv-lzw-strips", lambda p, im: cv2.imwrite(str(p), im)),
        ("tiled-deflate", lambda p, im: tifffile.imwrite(p, im[..., ::-1], tile=(64, 48), compression="zlib",
                                                         photometric="rgb")),
        ("strips-none", lambda p, im: tifffile.imwrite(p, im[..., ::-1], rowsperstrip=7, photometric="rgb")),
        ("tiled-zstd", lambda p, im: tifffile.imwrite(p, im[..., ::-1], tile=(32, 32), compression="zstd",
                                                      photometric="rgb")),
        ("grey-lzw", lambda p, im: tifffile.imwrite(p, im[..., 1], compression="lzw", photometric="minisblack",
                                                    rowsperstrip=5)),
    ]


@pytest.mark.parametrize("name,write", _writers(), ids=[n for n, _ in _writers()])
def test_a_tiff_read_band_by_band_gives_opencvs_pixels(tmp_path, name, write):
    image = _image(301, 203)  # sizes that are no multiple of a tile or strip
    path = tmp_path / f"{name}.tif"
    write(path, image)
    expected = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if name == "tiled-zstd":  # OpenCV's libtiff has no zstd: this one only we read (tifffile's whole decode)
        assert expected is None
        expected = np.ascontiguousarray(tifffile.imread(path)[..., ::-1])
    source = raster.open_image(str(path))
    assert isinstance(source, raster.TiffBands), name
    assert (source.height, source.width) == expected.shape[:2]
    for y0, y1 in ((0, 301), (0, 1), (63, 130), (290, 301), (31, 33)):
        assert np.array_equal(source.rows(y0, y1), expected[y0:y1]), (y0, y1)
    source.close()


def test_tiffs_it_cannot_read_in_pieces_are_decoded_whole_by_opencv(tmp_path):
    rgba = np.dstack([_image(40, 30), np.full((40, 30), 128, np.uint8)])
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    cv2.imwrite(str(tmp_path / "jpeg.tif"), _image(40, 30), [cv2.IMWRITE_TIFF_COMPRESSION, 7])
    tifffile.imwrite(tmp_path / "sixteen.tif", (_image(40, 30).astype(np.uint16) * 257), photometric="rgb")
    for name in ("rgba.tif", "jpeg.tif", "sixteen.tif"):
        source = raster.open_image(str(tmp_path / name))
        assert isinstance(source, raster.Decoded), name
        assert np.array_equal(source.rows(0, 40), cv2.imread(str(tmp_path / name), cv2.IMREAD_COLOR)), name


def test_an_unreadable_file_is_the_reason_not_a_traceback(tmp_path):
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(raster.ImageError, match="not a readable image"):
        raster.open_image(str(tmp_path / "broken.tif"))
    with pytest.raises(raster.ImageError, match="file not found"):
        raster.open_image(str(tmp_path / "missing.png"))


def test_shrink_is_the_block_mean_then_an_area_resize(monkeypatch):
    image = _image(600, 800, seed=3)
    # 800x600 -> 100x75: k = 8 exactly, so the block means are the result (an area resize by 1 changes nothing).
    blocks = image.astype(np.float64).reshape(75, 8, 100, 8, 3).mean(axis=(1, 3))
    got = raster.shrink(image, 100, 75)
    assert np.abs(got.astype(int) - np.rint(blocks).astype(int)).max() == 0
    # Bands of rows (forced small here) and partial blocks at the edges give what one pass over the array does:
    # 803x603 -> 100x75, k = 8, the last block row and column averaged over the 3 pixels they have.
    odd = _image(603, 803, seed=4)
    whole_pass = raster.shrink(odd, 100, 75)
    monkeypatch.setattr(raster, "SHRINK_BAND_PIXELS", 803 * 8 * 3)
    assert np.array_equal(raster.shrink(odd, 100, 75), whole_pass)
    sums = np.add.reduceat(np.add.reduceat(odd.astype(np.float64), np.arange(0, 603, 8), axis=0),
                           np.arange(0, 803, 8), axis=1)
    counts = np.outer([8] * 75 + [3], [8] * 100 + [3])[..., None]
    means = np.rint(sums / counts).astype(np.uint8)
    assert np.array_equal(whole_pass, cv2.resize(means, (100, 75), interpolation=cv2.INTER_AREA))
    # And a faithful small image of a photo-like (smooth) one: within 2 levels of OpenCV's own area resize.
    y, x = np.mgrid[0:603, 0:803]
    smooth = np.dstack([x * 255 // 802, y * 255 // 602, (x + y) * 255 // 1404]).astype(np.uint8)
    assert np.abs(raster.shrink(smooth, 100, 75).astype(int)
                  - cv2.resize(smooth, (100, 75), interpolation=cv2.INTER_AREA)).mean() < 2


def test_shrink_of_a_tiff_equals_shrink_of_its_decoded_pixels(tmp_path, monkeypatch):
    image = _image(517, 777, seed=5)
    cv2.imwrite(str(tmp_path / "a.tif"), image)
    monkeypatch.setattr(raster, "SHRINK_BAND_PIXELS", 777 * 40)  # several bands
    source = raster.open_image(str(tmp_path / "a.tif"))
    assert isinstance(source, raster.TiffBands)
    assert np.array_equal(raster.shrink(source, 97, 64), raster.shrink(image, 97, 64))
