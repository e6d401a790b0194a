"""A synthetic dataset in PASCAL VOC layout, so every command runs on a fresh machine with no download.

The dataset comes in *styles* (``wsss demo-data --style NAME``), each made to show one property of
real photos; every style uses VOC class names and indices, so ``wsss prepare voc`` reads it unchanged.

``shapes`` (the default) shows 1-3 composite objects (shape + texture + parts) over a cluttered,
textured background, six classes:

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

The pairs cat/dog and car/bus share body shape, colour and texture and differ only by a small part
(ears; wheels vs roof light).  Its class maps cover more than the objects: the opposite of CAMs on VOC.

``parts`` (160 px): eight classes in three look-alike groups -- cat, cow, dog, sheep (a four-legged
body), bicycle, motorbike (two wheels and a frame), bus, train (a long box with windows).  Within a
group the body's shape, colour distribution (muted, any hue) and texture are the same; a class differs
only by one small part near the middle of the body, in a saturated colour of its own (cat a flank mark,
cow an udder, dog a harness, sheep a ring, bicycle a chainring, motorbike an engine block, bus a roof
box, train a pantograph), about 5 % of the object.  The objects are large, and a second object is half
of the time a body without any part -- an object of no class, background, as VOC's unlabelled
look-alikes -- so that the part is all that tells a class: the classifier's CAM covers the part, as on
VOC a face or a wheel.

``context`` (96 px): six classes; bird, boat, cow and train appear on their own background (sky, water,
grass, rails) in 90 % of the images where they are the first-chosen class and on the clutter of
``shapes`` otherwise, bottle and cat on clutter or beside a context class -- the co-occurring context
that CAMs spill onto (boat and water, train and rails).

``voc-size`` (500 px): images of 500 x 333-400 pixels with 1-6 objects of ten classes, from 8 % to 60 %
of the short side, so output stride, memory and time behave as on VOC.

bench/styles.md measures what each style's CAMs do.

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

GENERATOR_VERSION = 1  # of the shapes style; each style records its own (DemoStyle.version)

DEFAULT_STYLE = "shapes"

#: VOC class index of every class of the shapes style (the positions in ``data/voc.txt``).
DEMO_CLASSES: dict[str, int] = {"bird": 3, "bottle": 5, "bus": 6, "car": 7, "cat": 8, "dog": 12}

#: Pairs told apart only by a small part.
LOOK_ALIKE_PAIRS: tuple[tuple[str, str], ...] = (("cat", "dog"), ("car", "bus"))

#: The parts style's classes and look-alike groups: a group shares body shape, colours and texture.
PARTS_CLASSES: dict[str, int] = {"bicycle": 2, "bus": 6, "cat": 8, "cow": 10, "dog": 12, "motorbike": 14,
                                 "sheep": 17, "train": 19}
PARTS_GROUPS: tuple[tuple[str, ...], ...] = (("cat", "cow", "dog", "sheep"), ("bicycle", "motorbike"),
                                             ("bus", "train"))
#: Bodies drawn without any part: objects of no class (background, unannotated), as VOC's unlabelled
#: look-alikes (a tram, a scooter); one is each further object of an image with probability PARTS_UNLABELLED_SHARE.
UNLABELLED_BODIES: tuple[str, ...] = ("quadruped without part", "two-wheeler without part", "long vehicle without part")
PARTS_UNLABELLED_SHARE = 0.5

#: The context style's classes and the background each context class appears on.
CONTEXT_CLASSES: dict[str, int] = {"bird": 3, "boat": 4, "bottle": 5, "cat": 8, "cow": 10, "train": 19}
CONTEXTS: dict[str, str] = {"bird": "sky", "boat": "water", "cow": "grass", "train": "rails"}
CONTEXT_SHARE = 0.9  # of a context class's images (as the first-chosen class) drawn on its context

#: The voc-size style's classes.
VOC_SIZE_CLASSES: dict[str, int] = {"bicycle": 2, "bird": 3, "boat": 4, "bottle": 5, "bus": 6, "car": 7, "cat": 8,
                                    "cow": 10, "dog": 12, "motorbike": 14}

MIN_VISIBLE_FRACTION = 0.3  # of the object's unoccluded area inside the image
MIN_VISIBLE_PIXELS = 24
OBJECT_REACH = 1.6  # local units from an object's centre beyond which none of its shapes reaches

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
        scene: the background drawn: ``clutter``, or a context style's ``sky``, ``water``, ``grass``, ``rails``.
    """

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    objects: list[DemoObject] = field(default_factory=list)
    scene: str = "clutter"


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


def _convex(u, v, corners):
    """Points inside the convex polygon with ``corners`` (each ``(u, v)``, in order, either direction)."""
    edges = zip(corners, corners[1:] + corners[:1])
    sides = [(q[0] - p[0]) * (v - p[1]) - (q[1] - p[1]) * (u - p[0]) for p, q in edges]
    return np.logical_and.reduce([side >= 0 for side in sides]) | np.logical_and.reduce([side <= 0 for side in sides])


def _segment(u, v, start, end, width):
    """Points within ``width / 2`` of the segment from ``start`` to ``end``: a bar with round ends."""
    (u0, v0), (u1, v1) = start, end
    du, dv = u1 - u0, v1 - v0
    along = np.clip(((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return (u - u0 - along * du) ** 2 + (v - v0 - along * dv) ** 2 <= (width / 2.0) ** 2


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


# The parts style's bodies: each group's classes share everything but the part drawn by the class's entry in
# _PARTS; the colour dict holds every part's colour, whatever the class.

def _draw_quadruped(u, v, spec: _ObjectSpec, paint: Painter) -> None:
    colours = spec.colours
    fur = colours["body"][None, None, :] * (1.0 + 0.2 * _waves(u, v, spec.phases, 10.0)[..., None])
    paint(_triangle(u, v, (-0.66, -0.14), (-0.66, 0.02), (-0.98, -0.42)), colours["dark"])  # tail
    for x in (-0.58, -0.36, 0.12, 0.34):
        paint(_box(u, v, x - 0.065, 0.05, x + 0.065, 0.74), fur)  # legs
    body = _ellipse(u, v, -0.12, 0.0, 0.62, 0.3) | _ellipse(u, v, 0.42, -0.22, 0.17, 0.2)
    paint(body | _ellipse(u, v, 0.62, -0.4, 0.24, 0.19), fur)  # torso, neck, head
    paint(_ellipse(u, v, 0.7, -0.44, 0.04, 0.04), colours["eyes"])
    paint(_ellipse(u, v, 0.84, -0.33, 0.05, 0.04), colours["dark"])  # nose
    _PARTS[spec.name](u, v, colours, paint)


def _draw_two_wheeler(u, v, spec: _ObjectSpec, paint: Painter) -> None:
    colours = spec.colours
    for x in (-0.6, 0.6):
        paint(_ellipse(u, v, x, 0.38, 0.34, 0.34), colours["tyres"])
        paint(_ellipse(u, v, x, 0.38, 0.2, 0.2), colours["light"])
        paint(_ellipse(u, v, x, 0.38, 0.06, 0.06), colours["dark"])
    corners = [(-0.6, 0.38), (-0.15, -0.25), (0.45, -0.25), (0.6, 0.38)]
    frame = _segment(u, v, (-0.6, 0.38), (0.0, 0.3), 0.1) | _segment(u, v, (0.0, 0.3), (0.45, -0.25), 0.1)
    for start, end in zip(corners, corners[1:]):
        frame |= _segment(u, v, start, end, 0.1)
    paint(frame, colours["body"])
    paint(_segment(u, v, (0.45, -0.25), (0.4, -0.55), 0.08) | _segment(u, v, (0.28, -0.56), (0.56, -0.56), 0.08),
          colours["dark"])  # handlebar
    paint(_ellipse(u, v, -0.18, -0.33, 0.17, 0.06), colours["dark"])  # saddle
    _PARTS[spec.name](u, v, colours, paint)


def _draw_long_vehicle(u, v, spec: _ObjectSpec, paint: Painter) -> None:
    colours = spec.colours
    for x in (-0.65, -0.4, 0.4, 0.65):
        paint(_ellipse(u, v, x, 0.3, 0.1, 0.1), colours["tyres"])
    stripes = 0.12 * np.sign(np.sin(14.0 * v + spec.phases[0]))
    paint(_box(u, v, -0.95, -0.32, 0.82, 0.28), colours["body"][None, None, :] * (1.0 + stripes[..., None]))
    paint(_box(u, v, -0.85, -0.22, 0.72, -0.02) & (np.mod(u * 3.2 + 0.5, 1.0) > 0.2), colours["windows"])
    _PARTS[spec.name](u, v, colours, paint)


def _cat_mark(u, v, colours, paint):
    paint(_convex(u, v, [(-0.12, -0.24), (0.03, -0.02), (-0.12, 0.2), (-0.27, -0.02)]), colours["mark"])


def _cow_udder(u, v, colours, paint):
    paint(_ellipse(u, v, -0.2, 0.3, 0.16, 0.11), colours["udder"])


def _dog_harness(u, v, colours, paint):
    paint(_box(u, v, 0.12, -0.27, 0.22, 0.27), colours["harness"])


def _sheep_ring(u, v, colours, paint):
    paint(_ellipse(u, v, -0.12, -0.02, 0.15, 0.15) & ~_ellipse(u, v, -0.12, -0.02, 0.07, 0.07), colours["ring"])


def _chainring(u, v, colours, paint):
    paint(_ellipse(u, v, 0.0, 0.3, 0.14, 0.14) | _segment(u, v, (0.0, 0.3), (0.12, 0.5), 0.06), colours["chainring"])


def _engine(u, v, colours, paint):
    block = _box(u, v, -0.12, 0.14, 0.12, 0.4)
    paint(block, colours["engine"])
    paint(block & (np.mod(v * 14.0, 1.0) > 0.6), colours["dark"])  # cooling fins


def _roof_box(u, v, colours, paint):
    paint(_box(u, v, -0.22, -0.45, 0.22, -0.32), colours["roof box"])


def _pantograph(u, v, colours, paint):
    paint(_segment(u, v, (-0.14, -0.32), (0.0, -0.5), 0.07) | _segment(u, v, (0.0, -0.5), (0.14, -0.32), 0.07)
          | _segment(u, v, (-0.2, -0.52), (0.2, -0.52), 0.07), colours["pantograph"])


def _no_part(u, v, colours, paint):
    """A body of no class has no part."""


_PART_HUES = {"mark": 0.88, "udder": 0.15, "harness": 0.0, "ring": 0.5, "chainring": 0.33, "engine": 0.08,
              "roof box": 0.62, "pantograph": 0.75}  # magenta, yellow, red, cyan, green, orange, blue, violet

# Near the middle of the body, so that a training crop of part of a large object still holds the part.
_PARTS: dict[str, Callable] = {"cat": _cat_mark, "cow": _cow_udder, "dog": _dog_harness, "sheep": _sheep_ring,
                               "bicycle": _chainring, "motorbike": _engine, "bus": _roof_box, "train": _pantograph,
                               **dict.fromkeys(UNLABELLED_BODIES, _no_part)}


def _parts_colours(rng: np.random.Generator, name: str) -> dict[str, np.ndarray]:
    """Colours of a parts-style object: the same draws for every class (look-alikes differ only in the part)."""
    if name not in PARTS_CLASSES and name not in UNLABELLED_BODIES:
        raise KeyError(f"unknown parts class {name!r}; choose from {sorted(PARTS_CLASSES)}")
    # A muted body of any hue; each class's part a saturated colour of its own, which no body or background
    # has: the part is easy to find, so the classifier learns it (from scratch, on a few hundred images).
    body = _hsv(rng.uniform(0, 1), rng.uniform(0.15, 0.45), rng.uniform(0.35, 0.75))
    colours = {"body": body, "dark": body * 0.4, "light": 0.5 + 0.5 * body, "eyes": _hsv(0, 0, 0.05),
               "tyres": _hsv(0, 0, 0.1), "windows": _jitter(rng, 0.55, 0.1, 0.95)}
    return colours | {part: _jitter(rng, hue, 0.95, 0.95, 0.015) for part, hue in _PART_HUES.items()}


_PARTS_DRAWERS = {"cat": _draw_quadruped, "cow": _draw_quadruped, "dog": _draw_quadruped, "sheep": _draw_quadruped,
                  "bicycle": _draw_two_wheeler, "motorbike": _draw_two_wheeler, "bus": _draw_long_vehicle,
                  "train": _draw_long_vehicle, "quadruped without part": _draw_quadruped,
                  "two-wheeler without part": _draw_two_wheeler, "long vehicle without part": _draw_long_vehicle}


def _draw_boat(u, v, spec: _ObjectSpec, paint: Painter) -> None:
    colours = spec.colours
    paint(_segment(u, v, (0.0, 0.15), (0.0, -0.95), 0.06), colours["mast"])
    paint(_triangle(u, v, (0.06, -0.9), (0.06, -0.2), (0.68, -0.2)), colours["sail"])
    paint(_box(u, v, -0.45, -0.12, 0.15, 0.12), colours["cabin"])
    paint(_box(u, v, -0.38, -0.06, 0.08, 0.02) & (np.mod(u * 6.0, 1.0) > 0.35), colours["mast"])  # cabin windows
    paint(_convex(u, v, [(-0.95, 0.1), (0.98, 0.1), (0.72, 0.45), (-0.75, 0.45)]), colours["hull"])
    paint(_box(u, v, -0.9, 0.12, 0.94, 0.18), colours["cabin"])  # a stripe along the hull


def _own_colours(rng: np.random.Generator, name: str) -> dict[str, np.ndarray]:
    """Class-specific colours (context and voc-size styles): shapes' classes as there, boat, cow and train their own;
    bicycle and motorbike the parts style's shared ones (a look-alike pair)."""
    if name in DEMO_CLASSES:
        return _class_colours(rng, name)
    if name in ("bicycle", "motorbike"):
        return _parts_colours(rng, name)
    if name == "boat":
        return {"hull": _jitter(rng, 0.0, 0.75, 0.5), "cabin": _hsv(0, 0, rng.uniform(0.85, 1.0)),
                "sail": _jitter(rng, 0.12, 0.12, 0.97, 0.02), "mast": _hsv(0, 0, 0.15)}
    if name == "cow":
        body = _jitter(rng, 0.07, 0.55, 0.45)
        return {"body": body, "dark": body * 0.4, "eyes": _hsv(0, 0, 0.05),
                "udder": _jitter(rng, 0.95, 0.4, 0.9, 0.02)}
    if name == "train":
        return {"body": _jitter(rng, 0.0, 0.75, 0.75), "windows": _jitter(rng, 0.55, 0.15, 0.95),
                "tyres": _hsv(0, 0, 0.1), "pantograph": _hsv(0, 0, 0.2)}
    raise KeyError(f"unknown demo class {name!r}")


_OWN_DRAWERS = {**_DRAWERS, "bicycle": _draw_two_wheeler, "motorbike": _draw_two_wheeler, "boat": _draw_boat,
                "cow": _draw_quadruped, "train": _draw_long_vehicle}


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


def _sky(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Blue from the top paling towards the horizon, with soft white clouds."""
    import cv2

    top, bottom = _jitter(rng, 0.58, 0.55, 0.9), _jitter(rng, 0.56, 0.15, 1.0)
    fade = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    canvas = (top * (1.0 - fade) + bottom * fade) + 0.03 * _smooth_noise(rng, height, width, 4, 1)
    clouds = np.zeros((height, width), dtype=np.float32)
    side = max(height, width)
    for _ in range(int(rng.integers(1, 5))):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.uniform(0.1, 0.25) * side) + 1, int(rng.uniform(0.03, 0.08) * side) + 1)
        cv2.ellipse(clouds, center, axes, 0.0, 0, 360, float(rng.uniform(0.6, 0.95)), -1)
    clouds = cv2.GaussianBlur(clouds, (0, 0), 0.03 * side)[..., None]
    return canvas * (1.0 - clouds) + clouds


def _water(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Deep blue-green with horizontal ripples and their highlights."""
    base = _jitter(rng, 0.54, 0.7, 0.55)
    wobble = _smooth_noise(rng, height, width, 5, 1)[..., 0]
    rows = np.arange(height, dtype=np.float32)[:, None]
    ripples = np.sin(2 * np.pi * rng.uniform(10, 16) * rows / height + 3.0 * wobble)
    canvas = base * (1.0 + 0.18 * ripples[..., None]) + 0.04 * _smooth_noise(rng, height, width, 6, 3)
    return canvas + 0.25 * (ripples > 0.93)[..., None]


def _grass(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Green meadow: patches of lighter and darker green and many short blades."""
    import cv2

    base = _jitter(rng, 0.27, 0.65, 0.5)
    canvas = np.ascontiguousarray(base + 0.1 * _smooth_noise(rng, height, width, 5, 1), dtype=np.float32)
    blade = max(3, height // 14)
    count = height * width // 30
    xs, ys = rng.integers(0, width, count), rng.integers(0, height, count)
    leans, shades = rng.uniform(-0.4, 0.4, count), rng.uniform(0.6, 1.35, count)
    for x, y, lean, shade in zip(xs, ys, leans, shades):
        colour = tuple(float(c) for c in np.clip(base * shade, 0, 1))
        cv2.line(canvas, (int(x), int(y)), (int(x + lean * blade), int(y - blade)), colour, 1)
    return canvas


def _rails(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Grey-brown gravel crossed by one or two tracks: wooden sleepers under two steel rails."""
    import cv2

    base = _jitter(rng, 0.08, 0.2, 0.5)
    gravel = cv2.GaussianBlur(rng.normal(0.0, 1.0, size=(height, width)).astype(np.float32), (0, 0), 0.8)
    canvas = np.ascontiguousarray(base * (1.0 + 0.25 * gravel[..., None]), dtype=np.float32)
    gauge, sleeper = max(4, int(0.12 * height)), max(2, int(0.03 * width))
    steel = tuple(float(c) for c in _hsv(0, 0, rng.uniform(0.6, 0.8)))
    wood = tuple(float(c) for c in _jitter(rng, 0.07, 0.6, 0.3))
    for _ in range(int(rng.integers(1, 3))):
        top = int(rng.uniform(0.1, 0.8) * height)
        for x in range(int(rng.integers(0, 3 * sleeper)), width, 3 * sleeper):
            cv2.rectangle(canvas, (x, top - gauge // 4), (x + sleeper, top + gauge + gauge // 4), wood, -1)
        for y in (top, top + gauge):
            cv2.line(canvas, (0, y), (width - 1, y), steel, max(1, height // 60))
    return canvas


_SCENES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "clutter": _background, "sky": _sky, "water": _water, "grass": _grass, "rails": _rails}


def _scene_background(rng: np.random.Generator, height: int, width: int, scene: str) -> np.ndarray:
    """The background float [H, W, 3] in 0..1 of ``scene`` (a key of ``_SCENES``)."""
    return np.clip(_SCENES[scene](rng, height, width), 0.0, 1.0).astype(np.float32)


def _random_object(rng: np.random.Generator, height: int, width: int) -> _ObjectSpec:
    names = sorted(DEMO_CLASSES)
    name = names[int(rng.integers(len(names)))]
    side = min(height, width)
    extent = rng.uniform(0.25, 0.6) * side  # the object's full size, [-1, 1] local units
    center = (rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height)
    return _ObjectSpec(name=name, center=center, half_size=extent / 2.0, angle=float(np.deg2rad(rng.uniform(-20, 20))),
                       mirror=bool(rng.integers(2)), colours=_class_colours(rng, name),
                       phases=rng.uniform(0, 2 * np.pi, size=4))


def _compose(background: np.ndarray, specs: list[_ObjectSpec],
             drawers: dict[str, Callable] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``specs`` in order over ``background``; return (image float [H, W, 3], instance map int [H, W]).

    The instance map holds 0 for background and ``k + 1`` where object ``k`` is the top-most one.
    ``drawers`` maps a class name to its drawing function (default: the shapes style's).
    """
    drawers = _DRAWERS if drawers is None else drawers
    height, width = background.shape[:2]
    image = background.copy()
    instances = np.zeros((height, width), dtype=np.int64)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    for number, spec in enumerate(specs, start=1):
        # Every shape lies within [-1, 1] local units (a radius of sqrt(2), rotated): only that window is drawn.
        reach = OBJECT_REACH * spec.half_size + 2.0
        rows = slice(max(0, int(spec.center[1] - reach)), max(0, min(height, int(np.ceil(spec.center[1] + reach)))))
        cols = slice(max(0, int(spec.center[0] - reach)), max(0, min(width, int(np.ceil(spec.center[0] + reach)))))
        dx, dy = xs[rows, cols] - spec.center[0], ys[rows, cols] - spec.center[1]
        cos, sin = np.cos(spec.angle), np.sin(spec.angle)
        u = (cos * dx + sin * dy) / spec.half_size
        v = (-sin * dx + cos * dy) / spec.half_size
        if spec.mirror:
            u = -u
        image_window, instance_window = image[rows, cols], instances[rows, cols]

        def paint(region: np.ndarray, colour: np.ndarray, _number: int = number, _image=image_window,
                  _instances=instance_window) -> None:
            colour = np.broadcast_to(colour, _image.shape)
            _image[region] = colour[region]
            _instances[region] = _number

        drawers[spec.name](u, v, spec, paint)
    return image, instances


def _unoccluded_area(background: np.ndarray, spec: _ObjectSpec, drawers: dict[str, Callable] | None = None) -> int:
    return int(np.count_nonzero(_compose(background, [spec], drawers)[1]))


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


def _render_shapes(rng: np.random.Generator, size: int) -> DemoSample:
    """The shapes style (its draws in the order of generator version 1: the same files for the same seed)."""
    short = int(round(rng.uniform(0.8, 1.0) * size))
    height, width = (size, short) if rng.integers(2) else (short, size)
    background = _background(rng, height, width)
    specs = [_random_object(rng, height, width) for _ in range(int(rng.integers(1, 4)))]
    grain = rng.normal(0.0, 0.025, size=(height, width, 3))
    return _finish(background, specs, grain, DEMO_CLASSES, _DRAWERS)


def _frame(rng: np.random.Generator, size: int, short_range: tuple[float, float]) -> tuple[int, int]:
    """``(height, width)``: the long side ``size``, the short one ``short_range`` x size, either orientation."""
    short = int(round(rng.uniform(*short_range) * size))
    return (size, short) if rng.integers(2) else (short, size)


def _place(rng: np.random.Generator, height: int, width: int, name: str, extent: float,
           colours: Callable[[np.random.Generator, str], dict], centre_range: tuple[float, float] = (0.2, 0.8),
           max_angle: float = 20.0) -> _ObjectSpec:
    """An object of class ``name``, ``extent`` pixels across, centred in ``centre_range`` of each side."""
    center = (rng.uniform(*centre_range) * width, rng.uniform(*centre_range) * height)
    return _ObjectSpec(name=name, center=center, half_size=extent / 2.0,
                       angle=float(np.deg2rad(rng.uniform(-max_angle, max_angle))), mirror=bool(rng.integers(2)),
                       colours=colours(rng, name), phases=rng.uniform(0, 2 * np.pi, size=4))


PARTS_OBJECT_SCALE = (0.6, 0.95)  # of the short side: large objects, so that the part is a small share of them
PARTS_OBJECTS = (1, 2)


def _render_parts(rng: np.random.Generator, size: int) -> DemoSample:
    height, width = _frame(rng, size, (0.8, 1.0))
    background = _background(rng, height, width)
    names = sorted(PARTS_CLASSES)
    specs = []
    for number in range(int(rng.integers(PARTS_OBJECTS[0], PARTS_OBJECTS[1] + 1))):
        name = names[int(rng.integers(len(names)))]
        unlabelled = number > 0 and rng.uniform() < PARTS_UNLABELLED_SHARE
        if unlabelled:
            name = UNLABELLED_BODIES[int(rng.integers(len(UNLABELLED_BODIES)))]
        extent = rng.uniform(*PARTS_OBJECT_SCALE) * min(height, width)
        spec = _place(rng, height, width, name, extent, _parts_colours, (0.35, 0.65), 15.0)
        if unlabelled:
            specs.insert(0, spec)  # under the labelled objects, so that an image always keeps one
        else:
            specs.append(spec)
    grain = rng.normal(0.0, 0.025, size=(height, width, 3))
    return _finish(background, specs, grain, {**PARTS_CLASSES, **dict.fromkeys(UNLABELLED_BODIES, 0)}, _PARTS_DRAWERS)


CONTEXT_OBJECT_SCALE = (0.25, 0.5)


def _render_context(rng: np.random.Generator, size: int) -> DemoSample:
    """One class chosen first; a context class's scene is its context with probability CONTEXT_SHARE.

    The other objects (0-2) are the first class again (on a context scene, half of them) or a class without a
    context, so a context class appears on another class's context never, and on clutter in the rest of its images.
    The first class is drawn last, on top: it is never removed for being hidden.
    """
    height, width = _frame(rng, size, (0.8, 1.0))
    names = sorted(CONTEXT_CLASSES)
    neutral = [name for name in names if name not in CONTEXTS]
    first = names[int(rng.integers(len(names)))]
    scene = CONTEXTS.get(first, "clutter") if rng.uniform() < CONTEXT_SHARE else "clutter"
    chosen = []
    for _ in range(int(rng.integers(0, 3))):
        same = scene != "clutter" and rng.uniform() < 0.5
        chosen.append(first if same else neutral[int(rng.integers(len(neutral)))])
    chosen.append(first)
    background = _scene_background(rng, height, width, scene)
    specs = [_place(rng, height, width, name, rng.uniform(*CONTEXT_OBJECT_SCALE) * min(height, width), _own_colours)
             for name in chosen]
    grain = rng.normal(0.0, 0.025, size=(height, width, 3))
    return _finish(background, specs, grain, CONTEXT_CLASSES, _OWN_DRAWERS, scene)


VOC_SIZE_OBJECT_SCALE = (0.08, 0.6)  # of the short side, log-uniform: many small objects, as on VOC
VOC_SIZE_OBJECTS = (1, 6)
MIN_OBJECT_PIXELS = 16  # the smallest object's extent, so that a small one keeps MIN_VISIBLE_PIXELS


def _render_voc_size(rng: np.random.Generator, size: int) -> DemoSample:
    height, width = _frame(rng, size, (0.66, 0.8))
    background = _background(rng, height, width)
    names = sorted(VOC_SIZE_CLASSES)
    low, high = np.log(VOC_SIZE_OBJECT_SCALE)
    specs = []
    for _ in range(int(rng.integers(VOC_SIZE_OBJECTS[0], VOC_SIZE_OBJECTS[1] + 1))):
        name = names[int(rng.integers(len(names)))]
        extent = max(MIN_OBJECT_PIXELS, float(np.exp(rng.uniform(low, high))) * min(height, width))
        specs.append(_place(rng, height, width, name, extent, _own_colours, (0.1, 0.9)))
    grain = rng.normal(0.0, 0.025, size=(height, width, 3))
    return _finish(background, specs, grain, VOC_SIZE_CLASSES, _OWN_DRAWERS)


def _finish(background: np.ndarray, specs: list[_ObjectSpec], grain: np.ndarray, classes: dict[str, int],
            drawers: dict[str, Callable], scene: str = "clutter") -> DemoSample:
    """Draw ``specs`` over ``background``, drop objects left too hidden, and make label, mask and boxes."""
    while True:
        image, instances = _compose(background, specs, drawers)
        visible = np.bincount(instances.reshape(-1), minlength=len(specs) + 1)[1:]
        too_small = [k for k, spec in enumerate(specs) if visible[k] < max(
            MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * _unoccluded_area(background, spec, drawers))]
        if not too_small:
            break
        # Removing a hidden object and re-drawing keeps image, mask and annotation in agreement.
        del specs[too_small[0]]
    class_of_instance = np.array([0] + [classes[spec.name] for spec in specs], dtype=np.uint8)
    label = class_of_instance[instances]
    mask = label.copy()
    mask[_boundary_band(label, instances)] = artifacts.IGNORE_INDEX
    objects = []
    for number, spec in enumerate(specs, start=1):
        if not classes[spec.name]:
            continue  # an object of no class is background
        rows, cols = np.nonzero(instances == number)
        objects.append(DemoObject(spec.name, (int(cols.min()) + 1, int(rows.min()) + 1, int(cols.max()) + 1,
                                              int(rows.max()) + 1)))
    pixels = np.clip((image + grain) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return DemoSample(image=pixels, label=label, mask=mask, objects=objects, scene=scene)


@dataclass(frozen=True)
class DemoStyle:
    """One style of the demo dataset.

    Attributes:
        name: what ``--style`` calls it.
        summary: one line for ``--help``.
        classes: VOC class name -> index of the classes it draws.
        default_size: the long image side without ``--size``.
        version: of the style's generator; written to demo.json (another version: other images).
        render: ``render(rng, size)`` draws one image.
        record: how the style draws its scenes, for demo.json.
    """

    name: str
    summary: str
    classes: dict[str, int]
    default_size: int
    version: int
    render: Callable[[np.random.Generator, int], DemoSample]
    record: dict


STYLES: dict[str, DemoStyle] = {style.name: style for style in (
    DemoStyle("shapes", "six classes as composite shapes on clutter (cat/dog and bus/car differ by a small part)",
              DEMO_CLASSES, DEFAULT_SIZE, GENERATOR_VERSION, _render_shapes,
              {"look_alike_pairs": LOOK_ALIKE_PAIRS, "objects_per_image": [1, 3], "object_scale": [0.25, 0.6]}),
    DemoStyle("parts", "eight classes in three look-alike groups told apart only by a small part of their own "
                       "colour, large objects, bodies without a part as background", PARTS_CLASSES, 160, 1,
              _render_parts,
              {"look_alike_groups": PARTS_GROUPS, "objects_per_image": list(PARTS_OBJECTS),
               "unlabelled_bodies": UNLABELLED_BODIES, "unlabelled_share_of_further_objects": PARTS_UNLABELLED_SHARE,
               "object_scale": list(PARTS_OBJECT_SCALE)}),
    DemoStyle("context", "six classes, of which bird, boat, cow and train are on their own background (sky, "
                         "water, grass, rails) in 90 % of their images", CONTEXT_CLASSES, 96, 1, _render_context,
              {"contexts": CONTEXTS, "context_share": CONTEXT_SHARE, "objects_per_image": [1, 3],
               "object_scale": list(CONTEXT_OBJECT_SCALE)}),
    DemoStyle("voc-size", "VOC-sized images (500 x 333-400 by default), ten classes, 1-6 objects, some small",
              VOC_SIZE_CLASSES, 500, 1, _render_voc_size,
              {"objects_per_image": list(VOC_SIZE_OBJECTS), "object_scale": list(VOC_SIZE_OBJECT_SCALE),
               "object_scale_distribution": "log-uniform", "short_side": [0.66, 0.8]}),
)}
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)


def get_style(name: str) -> DemoStyle:
    """The style called ``name``; a KeyError names the valid ones."""
    try:
        return STYLES[name]
    except KeyError:
        raise KeyError(f"unknown demo style {name!r}; choose from {', '.join(STYLE_NAMES)}") from None


def render_sample(rng: np.random.Generator, size: int | None = None, style: str = DEFAULT_STYLE) -> DemoSample:
    """Draw one synthetic image with its mask.

    Args:
        rng: the random generator (all randomness of the image comes from it).
        size: the long side in pixels (none: the style's default); the short side is drawn from the style's
            range ([0.8, 1.0] x size; voc-size [0.66, 0.8]).
        style: one of :data:`STYLE_NAMES`.

    Returns:
        A :class:`DemoSample` with the style's objects (at least one).
    """
    chosen = get_style(style)
    size = chosen.default_size if size is None else size
    if size < 16:
        raise ValueError(f"demo images need size >= 16, got {size}")
    return chosen.render(rng, size)


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
    else:
        written = {"style": DEFAULT_STYLE, **written}  # written before styles existed: the shapes style
    differs = {key: written.get(key) for key, value in wanted.items() if written.get(key) != value}
    if differs:
        have = ", ".join(f"{key} {written.get(key)}" for key in differs)
        want = ", ".join(f"{key} {wanted[key]}" for key in differs)
        raise WsssError(f"{root}: holds a demo dataset with {have} (asked: {want}); remove the folder or choose "
                        "another, so that no earlier image stays beside the new split lists")


def write_demo_dataset(out_dir: str | Path, *, num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL,
                       size: int | None = None, seed: int = 0, style: str = DEFAULT_STYLE,
                       progress: bool = True) -> Path:
    """Write the demo dataset under ``<out_dir>/VOC2012`` and return that folder.

    Args:
        out_dir: where ``VOC2012/`` is created.
        num_train, num_val: number of images of the ``train`` and ``val`` splits.
        size: long image side in pixels (none: the style's default).
        seed: image ``i`` is drawn with ``numpy.random.default_rng((seed, i))``.
        style: one of :data:`STYLE_NAMES`.
        progress: show a progress bar (see :mod:`wsss.progress`).
    """
    from wsss.progress import bar

    chosen = get_style(style)
    size = chosen.default_size if size is None else size
    root = Path(out_dir) / "VOC2012"
    _refuse_another_dataset(root, {"style": style, "version": chosen.version, "seed": seed, "size": size,
                                   "num_train": num_train, "num_val": num_val})
    splits = demo_ids(num_train, num_val)
    all_ids = splits["train"] + splits["val"]
    for index, image_id in enumerate(bar(all_ids, desc="demo-data", show=progress)):
        sample = render_sample(np.random.default_rng((seed, index)), size, style)
        height, width = sample.mask.shape
        artifacts.write_image(root / "JPEGImages" / f"{image_id}.jpg", sample.image)
        artifacts.write_label_png(artifacts.label_path(root / "SegmentationClass", image_id), sample.mask)
        with artifacts.atomic_write(root / "Annotations" / f"{image_id}.xml") as handle:
            handle.write(annotation_xml(image_id, width, height, sample.objects))
    for split, ids in splits.items():
        with artifacts.atomic_write(root / "ImageSets" / "Segmentation" / f"{split}.txt", "w") as handle:
            handle.write("".join(f"{image_id}\n" for image_id in ids))
    artifacts.write_json(root / "demo.json", {
        "generator": "wsss demo", "style": style, "version": chosen.version, "seed": seed, "size": size,
        "num_train": num_train, "num_val": num_val, "classes": chosen.classes, **chosen.record,
        "boundary_band_px": 1, "rng": "numpy.random.default_rng((seed, image_index))",
    })
    return root
