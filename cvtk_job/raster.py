"""The pixels of one image for tiled prediction: read a band of rows at a time where the format allows it.

`open_image(path)` gives a TIFF that can be read in pieces (8-bit grey or RGB, in strips or tiles, with a
lossless compression imagecodecs decodes) as `TiffBands`: a band of rows is decoded from the strips or tiles
that hold it, so a 16000x16000 mosaic needs one band of a tile's height in memory (16000 x 256 x 3 bytes =
12 MB) instead of the whole image (768 MB). Every other image is decoded whole by OpenCV (`Decoded`): PNG and
JPEG are coded as one sequential stream, which no library we use reads by window.

Both give exactly the pixels cv2.imread(path, cv2.IMREAD_COLOR) gives (BGR, uint8), and `shrink` makes the same
small image from either (box means over whole blocks, band by band, then OpenCV's area resize), so a TIFF and
the same image as a PNG give the same detections.
"""

import math

import numpy as np

# Compressions read band by band: lossless ones, whose pixels are the same whoever decodes them (a JPEG inside a
# TIFF may decode one level apart between libjpeg builds, so it is decoded by OpenCV like any JPEG).
# 1 none, 5 LZW, 8 and 32946 deflate, 32773 PackBits, 34925 LZMA, 50000 Zstandard.
LOSSLESS = {1, 5, 8, 32946, 32773, 34925, 50000}
# The pixels of a band `shrink` reads at a time (at least one block of rows): 2 Mpx, 24 MB as float32 BGR.
SHRINK_BAND_PIXELS = 2 * 2**20


class ImageError(Exception):
    """The file is not an image we can read: the reason, for the log line that skips it."""


class Decoded:
    """An image decoded whole (any format OpenCV reads)."""

    def __init__(self, image):
        self.image = image
        self.height, self.width = image.shape[:2]

    def rows(self, y0, y1):
        return self.image[y0:y1]

    def close(self):
        self.image = None


class TiffBands:
    """A TIFF read a band of rows at a time: only the strips or tiles that hold the band are decoded."""

    def __init__(self, tif, page):
        self.tif, self.page = tif, page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = min(int(page.rowsperstrip or self.height), self.height), self.width
        self.per_row = math.ceil(self.width / self.seg_w)
        self.grey = int(page.samplesperpixel) == 1

    def rows(self, y0, y1):
        page, fh = self.page, self.tif.filehandle
        out = np.zeros((y1 - y0, self.width, 3), dtype=np.uint8)  # a missing (sparse) segment stays black
        for r in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
            top = r * self.seg_h
            a, b = max(y0, top), min(y1, top + self.seg_h, self.height)
            for c in range(self.per_row):
                index = r * self.per_row + c
                if not page.databytecounts[index]:
                    continue
                fh.seek(page.dataoffsets[index])
                segment = page.decode(fh.read(page.databytecounts[index]), index, jpegtables=page.jpegtables)[0]
                segment = segment.reshape(-1, segment.shape[-2], segment.shape[-1])  # (rows, columns, samples)
                left = c * self.seg_w
                cols = min(self.seg_w, self.width - left)
                piece = segment[a - top:b - top, :cols]
                out[a - y0:b - y0, left:left + cols] = piece if self.grey else piece[..., ::-1]  # RGB -> BGR
        return out

    def close(self):
        self.tif.close()


def _tiff(path):
    """A TiffBands for a TIFF we can read in pieces and whose pixels are exactly what OpenCV would give, else
    None (then OpenCV decodes it whole)."""
    try:
        import tifffile
    except ImportError:
        return None
    try:
        tif = tifffile.TiffFile(path)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: OpenCV decides
        return None
    try:
        page = tif.pages[0]
        orientation = page.tags.get(274)
        readable = (page.dtype == np.uint8 and int(page.samplesperpixel) in (1, 3) and not page.extrasamples
                    and int(page.photometric) == (1 if int(page.samplesperpixel) == 1 else 2)
                    and (int(page.planarconfig) == 1 or int(page.samplesperpixel) == 1)
                    and int(page.imagedepth) == 1 and int(page.compression) in LOSSLESS
                    and (orientation is None or int(orientation.value) == 1) and len(page.dataoffsets) > 0)
    except Exception:  # noqa: BLE001 - a TIFF with no readable first page: OpenCV decides (and says why)
        readable = False
    if not readable:
        tif.close()
        return None
    return TiffBands(tif, page)


def open_image(path):
    """`TiffBands` where the file allows it, else `Decoded`; ImageError with the reason when unreadable."""
    import os

    if os.path.splitext(path)[1].lower() in (".tif", ".tiff"):
        bands = _tiff(path)
        if bands is not None:
            return bands
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError("file not found" if not os.path.exists(path) else "not a readable image")
    return Decoded(image)


def whole(source):
    return source.image if isinstance(source, Decoded) else source.rows(0, source.height)


def shrink(source, w, h):
    """The image scaled down to (w, h) (never up): the means of k x k blocks (k, the whole number of image
    pixels per small pixel on the tighter side; partial blocks at the right and bottom edges averaged over the
    pixels they have), read band by band, then OpenCV's area resize to exactly (w, h)."""
    import cv2

    if isinstance(source, np.ndarray):
        source = Decoded(source)
    k = max(1, int(min(source.width / w, source.height / h)))
    if k == 1:
        return cv2.resize(whole(source), (w, h), interpolation=cv2.INTER_AREA)
    columns = np.arange(0, source.width, k)
    widths = np.diff(np.append(columns, source.width)).astype(np.float32)
    band = max(k, SHRINK_BAND_PIXELS // (source.width * k) * k)  # whole blocks of rows
    parts = []
    for y0 in range(0, source.height, band):
        rows = source.rows(y0, min(y0 + band, source.height)).astype(np.float32)
        starts = np.arange(0, rows.shape[0], k)
        heights = np.diff(np.append(starts, rows.shape[0])).astype(np.float32)
        sums = np.add.reduceat(np.add.reduceat(rows, starts, axis=0), columns, axis=1)
        parts.append(sums / (heights[:, None, None] * widths[None, :, None]))
    means = np.clip(np.rint(np.concatenate(parts)), 0, 255).astype(np.uint8)
    return cv2.resize(means, (w, h), interpolation=cv2.INTER_AREA)
