"""Image files and arrays to a model's input: uint8 (H, W, C), C = 1 (grayscale) or 3 (RGB).

One conversion for every source (tfds arrays, image folders, files given to `predict`): PIL's
grayscale/RGB conversion and a bilinear (antialiased) resize, so a model sees the same pixels
whichever way an image reached it.
"""

import collections

import numpy as np

from flaxzoo.data.types import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what tfds's ImageFolder reads


def describe_shape(shape) -> str:
  height, width, channels = shape
  return f"{height}x{width} {'grayscale' if channels == 1 else 'RGB'}"


def _pil_mode(channels: int) -> str:
  if channels not in (1, 3):
    raise DataError(f"models take 1 (grayscale) or 3 (RGB) input channels, not {channels}")
  return "L" if channels == 1 else "RGB"


# Transparent pixels are composited on this background (white, as image viewers show them).
ALPHA_BACKGROUND = 255
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _is_gray_palette(image) -> bool:
  palette = image.getpalette() or []
  return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def is_grayscale(image) -> bool:
  """Whether an image's pixels are gray by its mode (and palette), from its header alone."""
  if image.mode in ("P", "PA"):
    return _is_gray_palette(image)
  return image.mode in GRAY_MODES


def to_8bit_gray_or_rgb(image):
  """A PIL image in mode L or RGB holding what its pixels are: 16-bit and 32-bit integer gray
  scaled to 8 bits (not clipped), alpha composited on `ALPHA_BACKGROUND`, gray palettes as L."""
  from PIL import Image
  if image.mode.startswith("I"):
    pixels = np.asarray(image, np.int64)
    if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:  # 16-bit samples: 0..65535
      pixels = (np.clip(pixels, 0, 65535) + 128) // 257
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
  gray = is_grayscale(image)
  if image.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,))
    image = Image.alpha_composite(background, rgba)
  return image.convert("L" if gray else "RGB")


def convert_pil_image(image, shape) -> np.ndarray:
  """A PIL image as uint8 (H, W, C) of `shape`: its pixels read faithfully (`to_8bit_gray_or_rgb`),
  converted to grayscale or RGB, then resized."""
  from PIL import Image
  height, width, channels = shape
  image = to_8bit_gray_or_rgb(image).convert(_pil_mode(channels))
  if image.size != (width, height):
    image = image.resize((width, height), Image.Resampling.BILINEAR)
  return np.asarray(image, np.uint8).reshape(shape)


def convert_images(images: np.ndarray, shape) -> np.ndarray:
  """uint8 (N, H, W, C) arrays to `shape` (H, W, C); returned unchanged when they already fit."""
  shape = tuple(shape)
  if images.shape[1:] == shape:
    return images
  from PIL import Image
  out = np.empty((len(images), *shape), np.uint8)
  for i, pixels in enumerate(images):
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    out[i] = convert_pil_image(image, shape)
  out.flags.writeable = False
  return out


def open_image(path, decode: bool = True):
  """The PIL image in `path` (only its header read unless `decode`); DataError naming the file
  when it is not one PIL can read."""
  from PIL import Image, UnidentifiedImageError
  try:
    image = Image.open(path)
    if decode:
      image.load()
  except FileNotFoundError as e:
    raise DataError(f"{path}: no such file") from e
  except IsADirectoryError as e:
    raise DataError(f"{path}: is a folder, not an image file") from e
  except Image.DecompressionBombError as e:
    raise DataError(f"{path}: too large to open ({e.args[0].rstrip('.')}); if the file is trusted, "
                    f"raise the limit with --max-image-pixels N") from e
  except (UnidentifiedImageError, OSError, ValueError) as e:
    reason = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
    raise DataError(f"{path}: cannot read it as an image ({reason}); give PNG or JPEG "
                    f"files") from e
  return image


def pil_shape(image) -> tuple[int, int, int]:
  """(H, W, C) of a PIL image as a model would see it unconverted: C is 1 for grayscale modes."""
  return image.height, image.width, 1 if is_grayscale(image) else 3


def header_shape(path) -> tuple[int, int, int]:
  """`pil_shape` from an image file's header, without decoding its pixels."""
  with open_image(path, decode=False) as image:
    return pil_shape(image)


def common_shape(shapes) -> tuple[int, int, int]:
  """The shape images of mixed sizes are converted to: the most common size; RGB if any is."""
  (height, width), _ = collections.Counter((h, w) for h, w, _ in shapes).most_common(1)[0]
  return height, width, max(c for _, _, c in shapes)


def conversion_note(name: str, shapes, target) -> str | None:
  """One line saying how the images of `name` are converted to `target`, or None if they fit."""
  counts = collections.Counter(tuple(s) for s in shapes)
  other = {s: n for s, n in counts.items() if s != tuple(target)}
  if not other:
    return None
  total = sum(counts.values())
  found = ", ".join(f"{n} of {total} are {describe_shape(s)}"
                    for s, n in sorted(other.items(), key=lambda item: -item[1])[:3])
  more = f" and {len(other) - 3} other shapes" if len(other) > 3 else ""
  return (f"{name}: converting images to {describe_shape(target)}, the model's input "
          f"({found}{more})")
