"""Image files: which files in a folder are images, and decoding one into a (3, h, w) uint8 RGB tensor.

The dataset loaders and ``predict`` share these, so a folder holds the same images for every command."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from ..checks import InputWarning

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")  # torchvision's


def is_image_file(path: str | os.PathLike) -> bool:
    """An image extension (any case) on a name that is not hidden. Hidden names (starting with ".") are left out as
    ``ls`` leaves them out: macOS writes a ``._x.jpg`` of metadata beside each copied ``x.jpg``."""
    name = os.path.basename(path)
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


_warned_turned: list = []  # the first image load_image warned about: once per process


def load_image(path: str | os.PathLike, upright: bool = False) -> tv_tensors.Image:
    """(3, h, w) uint8 RGB. Decodes fully now, so a truncated file fails here with its name, not in a worker.

    ``upright``: turn the pixels as the file's EXIF Orientation tag says, as a photo viewer shows them (phone
    photos are often stored sideways). Off for detection and segmentation datasets, whose boxes and masks are drawn
    on the stored pixels (torchvision and pycocotools read them so too), with a warning where the tag would turn
    them (labelling tools that show photos upright draw on the turned picture); on for classification folders and
    for ``predict`` on a user's own photos."""
    try:
        with Image.open(path) as img:
            img.load()
            turn = _exif_turn(img) if upright or not _warned_turned else None  # no EXIF read once warned
            if turn is not None and not upright:
                _warned_turned.append(path)
                warnings.warn(f"{path}: its EXIF orientation tag is not applied here, so its boxes or mask must be "
                              "drawn on the stored pixels, as torchvision and pycocotools read them; if the labelling "
                              "tool showed it turned, save the image upright (one warning for all such images)",
                              InputWarning, stacklevel=2)
            rgb = _to_rgb(img.transpose(turn) if upright and turn is not None else img)
    except FileNotFoundError as err:
        raise ValueError(f"{path}: image file not found; check the image folder and, for COCO, the image's "
                         "'file_name'") from err
    except Image.DecompressionBombError as err:            # an Exception, not an OSError: PIL's guard for huge images
        raise ValueError(f"{path}: {err} If the file is trusted, save a smaller copy of it, or from Python raise "
                         "PIL.Image.MAX_IMAGE_PIXELS (None: no limit) before loading it") from err
    except NoRGBView as err:                                # decoded, but no 8-bit RGB picture to make of it
        raise ValueError(f"{path}: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:      # PIL uses all three for corrupt files
        if isinstance(err, UnidentifiedImageError) and not is_image_file(path):  # notes.txt given to predict
            raise ValueError(f"{path}: not an image file: Pillow cannot read it, and its name has no image "
                             f"extension; give images ({', '.join(IMAGE_EXTENSIONS)})") from None
        raise ValueError(f"{path}: unreadable or truncated image ({err}); replace it with a readable copy") from err
    return tv_tensors.Image(torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous())


# EXIF Orientation -> the transpose that shows the stored pixels as meant (the values of the EXIF standard; the
# table ImageOps.exif_transpose uses)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def _exif_turn(img: Image.Image) -> Image.Transpose | None:
    """The transpose the EXIF Orientation tag asks for, None for none. Read by hand rather than applied with
    ``ImageOps.exif_transpose``, which also rewrites the EXIF block and fails (``struct.error``) on a mistyped tag
    that cameras and editors do write. EXIF that cannot be parsed at all asks for none: the image itself is fine."""
    try:
        return _ORIENTATION.get(img.getexif().get(0x0112))
    except Exception:  # noqa: BLE001 - metadata parsers raise many kinds; none of them makes the pixels wrong
        return None


class NoRGBView(ValueError):
    """Pixels that decode but have no standard 8-bit RGB reading."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grayscale (PNG, TIFF) is scaled to 0-255, where ``convert("RGB")`` would clip every value
    above 255 to white. 32-bit float pixels (TIFF mode F) are refused: they have no standard scale (0-1? 0-255?),
    and ``convert("RGB")`` truncates 0-1 values to a black image."""
    if img.mode == "F":
        values = np.asarray(img)
        raise NoRGBView(f"32-bit float pixels (values {values.min():g} to {values.max():g}) have no standard 0-255 "
                        "scale; save the image as 8-bit or 16-bit, scaled as you mean it")
    if img.mode.startswith("I;16") or (img.mode == "I" and np.asarray(img).max() > 255):
        gray = np.round(np.asarray(img, dtype=np.float64) * (255 / 65535)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return img.convert("RGB")
