"""A synthetic dataset in PASCAL VOC layout, so every command runs on a fresh machine with no download.

Each image shows 1-3 composite objects (shape + texture + parts) over a
cluttered, textured background.  Six VOC class names are used, so the output
is prepared by ``wsss prepare voc`` unchanged:

=========  =====  ==============================================================
class      index  appearance
=========  =====  ==============================================================
bird           3  green oval body, round head, pointed tail and beak, dark wing
bottle         5  purple glass body, narrow neck, coloured cap, light label band
bus            6  blue box with a band of windows **and a yellow roof light**
car            7  the same blue box with windows **and two black wheels**
cat            8  brown striped round head, eyes **and two pale pink pointed ears on top**
dog           12  the same brown striped head, eyes **and two dark round floppy side ears**
=========  =====  ==============================================================

The pairs cat/dog and car/bus share body shape, colour and texture and differ
only by a small part (ears; wheels vs roof light).  A classifier therefore
learns to fire on the small discriminative part and under-covers the body:
the partial-activation problem of class activation maps on real photos.

Objects are drawn in order, later ones occluding earlier ones; the mask shows
what stays visible.  An object left with too small a visible area is removed
from the scene (and the scene re-drawn), so the mask, the image and the XML
annotation always agree.  Like real VOC masks, every boundary between two
classes carries a thin (1 px) band of 255 ("ignore") on the side of the object
drawn on top.  Distractor strokes and blobs belong to the background.

Layout written by :func:`write_demo_dataset` under ``<out>/VOC2012/``::

    JPEGImages/<id>.jpg  SegmentationClass/<id>.png  Annotations/<id>.xml
    ImageSets/Segmentation/{train,val}.txt  demo.json

Generation is deterministic: image ``i`` uses ``numpy.random.default_rng((seed, i))``,
so the same seed gives bitwise-identical files.
"""

from __future__ import annotations

import colorsys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from wsss import artifacts
from wsss.errors import WsssError

GENERATOR_VERSION = 1

#: VOC class index of every demo class (the positions in ``data/voc.txt``).
DEMO_CLASSES: dict[str, int] = {"bird": 3, "bottle": 5, "bus": 6, "car": 7, "cat": 8, "dog": 12}

#: Pairs told apart only by a small part.
LOOK_ALIKE_PAIRS: tuple[tuple[str, str], ...] = (("cat", "dog"), ("car", "bus"))

MIN_VISIBLE_FRACTION = 0.3  # of the object's unoccluded area inside the image
MIN_VISIBLE_PIXELS = 24

DEFAULT_NUM_TRAIN = 40
DEFAULT_NUM_VAL = 20
DEFAULT_SIZE = 64


@dataclass
class DemoObject:
    """One visible object: VOC class name and 1-based inclusive box ``(xmin, ymin, xmax, ymax)``."""

    name: str
    bbox: tuple[int, int, int, int]


@dataclass
class DemoSample:
    """One generated image.

    Attributes:
        image: RGB uint8 [H, W, 3].
        label: uint8 [H, W] VOC class indices without the ignore band.
        mask: uint8 [H, W] ``label`` with the 255 boundary band (what is written to disk).
        objects: the visible objects in drawing order.
    """

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    objects: list[DemoObject] = field(default_factory=list)


@dataclass
class _ObjectSpec:
    name: str
    center: tuple[float, float]  # (x, y) in pixels
    half_size: float  # pixels per local unit; the object spans about [-1, 1] local units
    angle: float  # radians
    mirror: bool
    colours: dict[str, np.ndarray]  # part name -> RGB float [3] in 0..1
    phases: np.ndarray  # texture phases, float [4]


# --------------------------------------------------------------------------- colours and textures

def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, float(np.clip(saturation, 0, 1)), float(np.clip(value, 0, 1))))


def _jitter(rng: np.random.Generator, hue: float, saturation: float, value: float, hue_range: float = 0.03) -> np.ndarray:
    return _hsv(hue + rng.uniform(-hue_range, hue_range), saturation + rng.uniform(-0.12, 0.12),
                value + rng.uniform(-0.15, 0.15))


def _class_colours(rng: np.random.Generator, name: str) -> dict[str, np.ndarray]:
    """Random colours of an object's parts; look-alike pairs draw from the same distribution."""
    if name in ("cat", "dog"):
        body = _jitter(rng, 0.07, 0.7, 0.8)
        # The ears are the only difference: pale pink pointed ears vs dark brown floppy ones.
        ears = _jitter(rng, 0.95, 0.4, 0.95, 0.02) if name == "cat" else body * 0.4
        return {"body": body, "ears": ears, "eyes": _hsv(0.0, 0.0, 0.05)}
    if name in ("car", "bus"):
        body = _jitter(rng, 0.61, 0.75, 0.75)
        return {"body": body, "windows": _jitter(rng, 0.55, 0.15, 0.95), "wheels": _hsv(0, 0, 0.08),
                "hubs": _hsv(0, 0, 0.6), "light": _jitter(rng, 0.15, 0.95, 1.0, 0.02)}
    if name == "bird":
        body = _jitter(rng, 0.3, 0.75, 0.75)
        return {"body": body, "wing": body * 0.55, "beak": _jitter(rng, 0.11, 0.9, 0.95, 0.02),
                "eyes": _hsv(0, 0, 0.05)}
    if name == "bottle":
        body = _jitter(rng, 0.8, 0.65, 0.6)
        return {"body": body, "cap": _jitter(rng, 0.0, 0.85, 0.85, 0.04), "label": _jitter(rng, 0.13, 0.2, 0.95)}
    raise KeyError(f"unknown demo class {name!r}; choose from {sorted(DEMO_CLASSES)}")


def _waves(u: np.ndarray, v: np.ndarray, phases: np.ndarray, frequency: float) -> np.ndarray:
    """A fur-like texture in local coordinates (it turns with the object), values in [-1, 1]."""
    return np.sin(frequency * (u + 0.6 * v) + phases[0]) * np.cos(frequency * 0.7 * (v - 0.3 * u) + phases[1])


# --------------------------------------------------------------------------- shapes (local units, v points down)

def _ellipse(u, v, cu, cv, ru, rv):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _box(u, v, u0, v0, u1, v1):
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _triangle(u, v, a, b, c):
    """Points inside the triangle with corners ``a``, ``b``, ``c`` (each ``(u, v)``)."""
    def side(p, q):
        return (q[0] - p[0]) * (v - p[1]) - (q[1] - p[1]) * (u - p[0])
    s1, s2, s3 = side(a, b), side(b, c), side(c, a)
    return ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))


Painter = Callable[[np.ndarray, np.ndarray], None]


def _draw_animal(u, v, spec: _ObjectSpec, paint: Painter) -> None:
    colours, texture = spec.colours, _waves(u, v, spec.phases, 9.0)
    # Ears first so the head overlaps their base.
    if spec.name == "cat":
        for sign in (-1.0, 1.0):
            paint(_triangle(u, v, (sign * 0.15, -0.2), (sign * 0.75, -0.25), (sign * 0.55, -1.0)), colours["ears"])
    else:
        for sign in (-1.0, 1.0):
            paint(_ellipse(u, v, sign * 0.78, 0.15, 0.22, 0.45), colours["ears"])
    head = _ellipse(u, v, 0.0, 0.2, 0.72, 0.65)
    paint(head, colours["body"][None, None, :] * (1.0 + 0.25 * texture[..., None]))
    for sign in (-1.0, 1.0):
        paint(_ellipse(u, v, sign * 0.28, 0.05, 0.1, 0.12), colours["eyes"])
    paint(_ellipse(u, v, 0.0, 0.42, 0.1, 0.07), colours["eyes"])


def _draw_vehicle(u, v, spec: _ObjectSpec, paint: Painter) -> None:
    colours = spec.colours
    if spec.name == "bus":
        paint(_box(u, v, -0.2, -0.68, 0.2, -0.4), colours["light"])
    body = _box(u, v, -0.95, -0.45, 0.95, 0.4)
    stripes = 0.12 * np.sign(np.sin(14.0 * v + spec.phases[0]))
    paint(body, colours["body"][None, None, :] * (1.0 + stripes[..., None]))
    windows = _box(u, v, -0.8, -0.32, 0.8, -0.05) & (np.mod(u * 3.2 + 0.5, 1.0) > 0.2)
    paint(windows, colours["windows"])
    if spec.name == "car":
        for sign in (-1.0, 1.0):
            paint(_ellipse(u, v, sign * 0.55, 0.42, 0.26, 0.26), colours["wheels"])
            paint(_ellipse(u, v, sign * 0.55, 0.42, 0.1, 0.1), colours["hubs"])


def _draw_bird(u, v, spec: _ObjectSpec, paint: Painter) -> None:
    colours = spec.colours
    paint(_triangle(u, v, (-0.4, 0.0), (-1.0, -0.35), (-0.95, 0.3)), colours["wing"])  # tail
    paint(_triangle(u, v, (0.6, -0.5), (0.6, -0.22), (1.0, -0.3)), colours["beak"])
    texture = _waves(u, v, spec.phases, 12.0)
    body = _ellipse(u, v, -0.05, 0.1, 0.6, 0.42) | _ellipse(u, v, 0.45, -0.35, 0.27, 0.27)
    paint(body, colours["body"][None, None, :] * (1.0 + 0.15 * texture[..., None]))
    paint(_ellipse(u, v, -0.15, 0.08, 0.38, 0.2), colours["wing"])
    paint(_ellipse(u, v, 0.52, -0.4, 0.07, 0.07), colours["eyes"])


def _draw_bottle(u, v, spec: _ObjectSpec, paint: Painter) -> None:
    colours = spec.colours
    shading = 1.0 + 0.35 * np.exp(-((u + 0.15) / 0.08) ** 2) - 0.25 * np.abs(u)  # glass highlight
    glass = _box(u, v, -0.45, -0.15, 0.45, 0.95) | _ellipse(u, v, 0.0, -0.15, 0.45, 0.28) | _box(u, v, -0.16, -0.72, 0.16, -0.2)
    paint(glass, colours["body"][None, None, :] * shading[..., None])
    paint(_box(u, v, -0.2, -0.95, 0.2, -0.72), colours["cap"])
    paint(_box(u, v, -0.45, 0.25, 0.45, 0.6), colours["label"])


_DRAWERS = {"cat": _draw_animal, "dog": _draw_animal, "car": _draw_vehicle, "bus": _draw_vehicle,
            "bird": _draw_bird, "bottle": _draw_bottle}


# --------------------------------------------------------------------------- scene

def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise float [H, W, channels] in about [-1, 1] (a coarse grid, bicubically upsampled)."""
    import cv2

    grid = rng.uniform(-1.0, 1.0, size=(cells, cells, channels)).astype(np.float32)
    noise = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return noise.reshape(height, width, channels)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A cluttered background float [H, W, 3] in 0..1: muted colour field, grain, strokes and blobs."""
    import cv2

    base = _hsv(rng.uniform(0, 1), rng.uniform(0.05, 0.3), rng.uniform(0.4, 0.75))
    cells = int(rng.integers(3, 7))
    # Mostly brightness variation, a little hue variation, plus a fine grain: clutter without bright colours.
    field_ = base + 0.12 * _smooth_noise(rng, height, width, cells, 1) + 0.06 * _smooth_noise(rng, height, width, cells, 3)
    field_ += 0.05 * _smooth_noise(rng, height, width, max(4, height // 4), 1)
    canvas = np.ascontiguousarray(np.clip(field_, 0, 1), dtype=np.float32)
    side = max(height, width)
    for _ in range(int(rng.integers(2, 7))):  # strokes
        colour = tuple(float(c) for c in _hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.9)))
        start = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        length, direction = rng.uniform(0.2, 0.7) * side, rng.uniform(0, np.pi)
        end = (int(start[0] + length * np.cos(direction)), int(start[1] + length * np.sin(direction)))
        cv2.line(canvas, start, end, colour, thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 4))):  # blobs
        colour = tuple(float(c) for c in _hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.5), rng.uniform(0.25, 0.9)))
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.uniform(0.04, 0.14) * side) + 1, int(rng.uniform(0.04, 0.14) * side) + 1)
        cv2.ellipse(canvas, center, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, lineType=cv2.LINE_AA)
    return canvas


def _random_object(rng: np.random.Generator, height: int, width: int) -> _ObjectSpec:
    names = sorted(DEMO_CLASSES)
    name = names[int(rng.integers(len(names)))]
    side = min(height, width)
    extent = rng.uniform(0.25, 0.6) * side  # the object's full size, [-1, 1] local units
    center = (rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height)
    return _ObjectSpec(name=name, center=center, half_size=extent / 2.0, angle=float(np.deg2rad(rng.uniform(-20, 20))),
                       mirror=bool(rng.integers(2)), colours=_class_colours(rng, name),
                       phases=rng.uniform(0, 2 * np.pi, size=4))


def _compose(background: np.ndarray, specs: list[_ObjectSpec]) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``specs`` in order over ``background``; return (image float [H, W, 3], instance map int [H, W]).

    The instance map holds 0 for background and ``k + 1`` where object ``k`` is the top-most one.
    """
    height, width = background.shape[:2]
    image = background.copy()
    instances = np.zeros((height, width), dtype=np.int64)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    for number, spec in enumerate(specs, start=1):
        dx, dy = xs - spec.center[0], ys - spec.center[1]
        cos, sin = np.cos(spec.angle), np.sin(spec.angle)
        u = (cos * dx + sin * dy) / spec.half_size
        v = (-sin * dx + cos * dy) / spec.half_size
        if spec.mirror:
            u = -u

        def paint(region: np.ndarray, colour: np.ndarray, _number: int = number) -> None:
            colour = np.broadcast_to(colour, image.shape)
            image[region] = colour[region]
            instances[region] = _number

        _DRAWERS[spec.name](u, v, spec, paint)
    return image, instances


def _unoccluded_area(background: np.ndarray, spec: _ObjectSpec) -> int:
    return int(np.count_nonzero(_compose(background, [spec])[1]))


def _boundary_band(label: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """bool [H, W]: the 1 px band VOC-style masks mark as 255.

    A pixel belongs to the band when a 4-neighbour has another class and lies
    *under* it in drawing order (background lowest), so the band sits on the
    inside of the top-most object and is one pixel wide.
    """
    band = np.zeros(label.shape, dtype=bool)
    for axis in (0, 1):
        for shift in (1, -1):
            neighbour_label = np.roll(label, shift, axis=axis)
            neighbour_instance = np.roll(instances, shift, axis=axis)
            edge = (neighbour_label != label) & (neighbour_instance < instances)
            # np.roll wraps around; the first row/column in the roll direction has no real neighbour.
            index = [slice(None), slice(None)]
            index[axis] = 0 if shift == 1 else -1
            edge[tuple(index)] = False
            band |= edge
    return band


def render_sample(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> DemoSample:
    """Draw one synthetic image with its mask.

    Args:
        rng: the random generator (all randomness of the image comes from it).
        size: the long side in pixels; the short side is drawn from [0.8, 1.0] x size.

    Returns:
        A :class:`DemoSample` with 1-3 visible objects.
    """
    if size < 16:
        raise ValueError(f"demo images need size >= 16, got {size}")
    short = int(round(rng.uniform(0.8, 1.0) * size))
    height, width = (size, short) if rng.integers(2) else (short, size)
    background = _background(rng, height, width)
    specs = [_random_object(rng, height, width) for _ in range(int(rng.integers(1, 4)))]
    grain = rng.normal(0.0, 0.025, size=(height, width, 3))
    while True:
        image, instances = _compose(background, specs)
        visible = np.bincount(instances.reshape(-1), minlength=len(specs) + 1)[1:]
        too_small = [k for k, spec in enumerate(specs)
                     if visible[k] < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * _unoccluded_area(background, spec))]
        if not too_small:
            break
        # Removing a hidden object and re-drawing keeps image, mask and annotation in agreement.
        del specs[too_small[0]]
    class_of_instance = np.array([0] + [DEMO_CLASSES[spec.name] for spec in specs], dtype=np.uint8)
    label = class_of_instance[instances]
    mask = label.copy()
    mask[_boundary_band(label, instances)] = artifacts.IGNORE_INDEX
    objects = []
    for number, spec in enumerate(specs, start=1):
        rows, cols = np.nonzero(instances == number)
        objects.append(DemoObject(spec.name, (int(cols.min()) + 1, int(rows.min()) + 1, int(cols.max()) + 1,
                                              int(rows.max()) + 1)))
    pixels = np.clip((image + grain) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return DemoSample(image=pixels, label=label, mask=mask, objects=objects)


# --------------------------------------------------------------------------- files

def annotation_xml(image_id: str, width: int, height: int, objects: list[DemoObject]) -> bytes:
    """Return a VOC-style annotation: filename, size and one ``<object>`` with ``<bndbox>`` per object."""
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "folder").text = "VOC2012"
    ElementTree.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ElementTree.SubElement(root, "source")
    ElementTree.SubElement(source, "database").text = "wsss demo"
    size_element = ElementTree.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ElementTree.SubElement(size_element, tag).text = str(value)
    ElementTree.SubElement(root, "segmented").text = "1"
    for obj in objects:
        element = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(element, "name").text = obj.name
        ElementTree.SubElement(element, "pose").text = "Unspecified"
        ElementTree.SubElement(element, "truncated").text = "0"
        ElementTree.SubElement(element, "difficult").text = "0"
        box = ElementTree.SubElement(element, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.bbox):
            ElementTree.SubElement(box, tag).text = str(value)
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="utf-8") + b"\n"


def demo_ids(num_train: int, num_val: int) -> dict[str, list[str]]:
    """Return the image ids of each split: ``demo_000000``... (train first, then val)."""
    ids = [f"demo_{index:06d}" for index in range(num_train + num_val)]
    return {"train": ids[:num_train], "val": ids[num_train:]}


def _refuse_another_dataset(root: Path, wanted: dict) -> None:
    """Raise WsssError when ``root`` holds anything but the demo dataset ``wanted`` describes.

    Writing a demo of another size over an earlier one would leave the earlier images beside the
    new split lists, and a folder that is not a demo dataset is the user's data: neither is touched.
    """
    if not root.exists() or not any(root.iterdir()):
        return
    manifest = root / "demo.json"
    if not manifest.is_file():
        raise WsssError(f"{root}: exists and is not a demo dataset; choose another folder")
    try:
        written = artifacts.read_json(manifest, expect=dict)
    except WsssError:
        written = {}
    differs = {key: written.get(key) for key, value in wanted.items() if written.get(key) != value}
    if differs:
        have = ", ".join(f"{key} {written.get(key)}" for key in differs)
        want = ", ".join(f"{key} {wanted[key]}" for key in differs)
        raise WsssError(f"{root}: holds a demo dataset with {have} (asked: {want}); remove the folder or choose "
                        "another, so that no earlier image stays beside the new split lists")


def write_demo_dataset(out_dir: str | Path, *, num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL,
                       size: int = DEFAULT_SIZE, seed: int = 0, progress: bool = True) -> Path:
    """Write the demo dataset under ``<out_dir>/VOC2012`` and return that folder.

    Args:
        out_dir: where ``VOC2012/`` is created.
        num_train, num_val: number of images of the ``train`` and ``val`` splits.
        size: long image side in pixels.
        seed: image ``i`` is drawn with ``numpy.random.default_rng((seed, i))``.
        progress: show a progress bar (see :mod:`wsss.progress`).
    """
    from wsss.progress import bar

    root = Path(out_dir) / "VOC2012"
    _refuse_another_dataset(root, {"version": GENERATOR_VERSION, "seed": seed, "size": size, "num_train": num_train,
                                   "num_val": num_val})
    splits = demo_ids(num_train, num_val)
    all_ids = splits["train"] + splits["val"]
    for index, image_id in enumerate(bar(all_ids, desc="demo-data", show=progress)):
        sample = render_sample(np.random.default_rng((seed, index)), size)
        height, width = sample.mask.shape
        artifacts.write_image(root / "JPEGImages" / f"{image_id}.jpg", sample.image)
        artifacts.write_label_png(artifacts.label_path(root / "SegmentationClass", image_id), sample.mask)
        with artifacts.atomic_write(root / "Annotations" / f"{image_id}.xml") as handle:
            handle.write(annotation_xml(image_id, width, height, sample.objects))
    for split, ids in splits.items():
        with artifacts.atomic_write(root / "ImageSets" / "Segmentation" / f"{split}.txt", "w") as handle:
            handle.write("".join(f"{image_id}\n" for image_id in ids))
    artifacts.write_json(root / "demo.json", {
        "generator": "wsss demo", "version": GENERATOR_VERSION, "seed": seed, "size": size,
        "num_train": num_train, "num_val": num_val, "classes": DEMO_CLASSES,
        "look_alike_pairs": LOOK_ALIKE_PAIRS, "objects_per_image": [1, 3], "object_scale": [0.25, 0.6],
        "boundary_band_px": 1, "rng": "numpy.random.default_rng((seed, image_index))",
    })
    return root
