"""Every artifact path and file format of the pipeline, read and written in one place.

Stages never build artifact paths by hand and never open artifact files
themselves: they call the functions below.  Every write is atomic (a temporary
file in the same folder, then :func:`os.replace`), so a killed run never
leaves a half-written file behind.

Formats (see the README's "Artifacts" section):

* checkpoint: ``torch.save`` dict ``{model, optimizer, scheduler, epoch, config, classes, arch, ...}``
* CAM: ``<id>.npz`` without pickle, ``keys`` int16 [K] (class indices, background = 0 is never a
  key), ``cams`` float16 [K, H, W] max-normalised to [0, 1]
* label map (pseudo-label, prediction, mask): ``<id>.png`` uint8 palette PNG, 0 = background,
  255 = ignore
* reliability: ``<id>.npy`` plain float16 [H, W]
* provenance: ``config.json`` and ``metrics.json`` in every stage's output folder

Every reader checks what it reads (a truncated or empty file, missing keys, a wrong dtype or
shape, NaN or out-of-range values, class indices outside the dataset's class list) and raises
one :class:`~wsss.errors.WsssError` whose message names the file; resume checks treat such a
file as not done.  Nothing is written with NaN or infinity in it: JSON files get ``null`` for a
non-finite number (an undefined score such as the mIoU of an empty confusion matrix), and the
array writers refuse non-finite arrays.  Files are created with the usual ``0o666 & ~umask``
mode, like any other program's, so a group that shares a dataset folder can read them.

A pipeline run folder has one sub-folder per stage, :data:`RUN_LAYOUT`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from wsss.errors import WsssError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "best.pth"
IGNORE_INDEX = 255
#: ``wsss pretrain``'s output trunk, loadable by ``--weights PATH`` of the training stages.
PRETRAINED_BACKBONE = "backbone.pth"
# float16 rounding of a max-normalised CAM stays within this of [0, 1]
_CAM_TOLERANCE = 1e-3
# what numpy, zipfile and zlib raise for a truncated, empty or foreign .npz / .npy file
_ARRAY_FILE_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


# --------------------------------------------------------------------------- run layout

@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The stage folders of a pipeline run (``wsss pipeline``, ``wsss report``, ``bench/``).

    ``<run>/<cls>`` holds train-cls's checkpoints, ``<run>/<cams>`` make-cam's CAMs (and their
    threshold sweep), ``<run>/<pseudo>`` refine's pseudo-labels and reliability maps,
    ``<run>/<seg>`` train-seg's checkpoints, ``<run>/<pred>`` predict's label maps of the
    validation split and ``<run>/pred_<split>`` those of another split; ``pretrain`` and ``aff``
    are the optional self-supervised backbone and affinity network, ``seg_gt`` the optional DeepLab
    trained on the ground truth with the same recipe (the upper bound of weak/full).  ``wsss report`` writes
    ``<run>/report.md`` with its figures in ``<run>/report/``.
    """

    pretrain: str = "pretrain"
    cls: str = "cls"
    cams: str = "cams"
    aff: str = "aff"
    pseudo: str = "pseudo"
    seg: str = "seg"
    seg_gt: str = "seg_gt"
    pred: str = "pred"
    report_file: str = "report.md"
    report_figures: str = "report"

    def folder(self, run_dir: str | Path, stage: str) -> Path:
        """``<run_dir>/<folder of stage>``, e.g. ``folder(run, "cams")``."""
        return Path(run_dir) / getattr(self, stage)

    def pred_folder(self, run_dir: str | Path, split: str | None = None) -> Path:
        """Predictions of the validation split (``split=None``) or of ``split``: ``<run>/pred_<split>``."""
        return Path(run_dir) / (self.pred if split is None else f"{self.pred}_{split}")


RUN_LAYOUT = RunLayout()


# --------------------------------------------------------------------------- paths

def cam_path(folder: str | Path, image_id: str) -> Path:
    """Return the CAM file of an image: ``<folder>/<id>.npz``."""
    return Path(folder) / f"{image_id}.npz"


def irn_cam_path(folder: str | Path, image_id: str) -> Path:
    """Return the IRN-style pickled CAM file of an image: ``<folder>/<id>.npy``."""
    return Path(folder) / f"{image_id}.npy"


def find_cam(folder: str | Path, image_id: str) -> Path | None:
    """The image's CAM file in ``folder``: ``<id>.npz``, else the IRN-style ``<id>.npy``, else None."""
    for path in (cam_path(folder, image_id), irn_cam_path(folder, image_id)):
        if path.is_file():
            return path
    return None


def require_cams(folder: str | Path, ids: list[str], split: str, allow_pickle: bool = False) -> dict[str, Path]:
    """Every image's CAM file in ``folder`` (id -> path), checked before any work.

    Raises:
        WsssError: the folder is missing, an image has no CAM file (naming the first and the count),
            or a pickled IRN-style ``.npy`` CAM is found without ``allow_pickle``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WsssError(f"{folder}: CAM folder not found (run `wsss make-cam` first)")
    files = {image_id: find_cam(folder, image_id) for image_id in ids}
    missing = [image_id for image_id, path in files.items() if path is None]
    if missing:
        raise WsssError(f"{cam_path(folder, missing[0])}: CAM file not found ({len(missing)} of {len(ids)} images of "
                        f"split {split!r} have no CAM)")
    pickled = [path for path in files.values() if path.suffix == ".npy"]
    if pickled and not allow_pickle:
        raise WsssError(f"{pickled[0]}: IRN-style .npy CAM dicts are pickles (loading runs code from the file); "
                        "pass --allow-pickle if you trust them")
    return files


def label_path(folder: str | Path, image_id: str) -> Path:
    """Return the label-map PNG of an image (pseudo-label, prediction or mask)."""
    return Path(folder) / f"{image_id}.png"


def reliability_path(folder: str | Path, image_id: str) -> Path:
    """Return the reliability map of an image: ``<folder>/<id>.npy``."""
    return Path(folder) / f"{image_id}.npy"


def overlay_path(folder: str | Path, image_id: str) -> Path:
    """Return the colour overlay JPEG of an image."""
    return Path(folder) / f"{image_id}.jpg"


def checkpoint_path(folder: str | Path, which: str = "last") -> Path:
    """Return ``<folder>/last.pth`` or ``<folder>/best.pth``."""
    names = {"last": LAST_CHECKPOINT, "best": BEST_CHECKPOINT}
    if which not in names:
        raise KeyError(f"unknown checkpoint {which!r}; choose from {sorted(names)}")
    return Path(folder) / names[which]


def pretrained_backbone_path(folder: str | Path) -> Path:
    """Return ``<folder>/backbone.pth``, the trunk that ``wsss pretrain`` writes (torchvision names)."""
    return Path(folder) / PRETRAINED_BACKBONE


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a ``--checkpoint`` option names: a file as given, or a training output
    folder's ``best.pth`` (``last.pth`` when the run wrote no ``best.pth``).

    Every stage that reads a trained network resolves its option here, so all of them pick the
    same file from the same folder.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    best = checkpoint_path(path, "best")
    return best if best.is_file() else checkpoint_path(path, "last")


def _shard_suffix(shard: tuple[int, int] | None) -> str:
    return "" if shard is None or shard[1] == 1 else f".shard-{shard[0]}-of-{shard[1]}"


def config_path(folder: str | Path, shard: tuple[int, int] | None = None) -> Path:
    """``<folder>/config.json`` (``config.shard-I-of-N.json`` for one shard of a ``--shard I/N`` run)."""
    return Path(folder) / CONFIG_FILE.replace(".json", _shard_suffix(shard) + ".json")


def metrics_path(folder: str | Path, shard: tuple[int, int] | None = None) -> Path:
    """``<folder>/metrics.json`` (``metrics.shard-I-of-N.json`` for one shard of a ``--shard I/N`` run)."""
    return Path(folder) / METRICS_FILE.replace(".json", _shard_suffix(shard) + ".json")


def eval_metrics_path(folder: str | Path, split: str) -> Path:
    """Return the default report of ``wsss eval`` on a folder: ``<folder>/metrics_eval_<split>.json``."""
    return Path(folder) / f"metrics_eval_{split}.json"


def eval_metrics_beside(folder: str | Path, split: str) -> Path:
    """Return the default report of ``wsss eval`` on a ground-truth folder, beside it (a dataset's folder is
    never written into): ``<parent>/<folder name>_metrics_eval_<split>.json``."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}_metrics_eval_{split}.json"


# --------------------------------------------------------------------------- atomic writes

def _umask() -> int:
    """This process's umask, read without changing it where the system allows (threads write files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    If the body raises (or the process dies), ``path`` is untouched and the
    temporary file is removed (or, after a hard kill, left as a hidden
    ``.<name>.*.tmp`` that no reader ever picks up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode open() would (0666 minus the umask)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def jsonable(value: Any) -> Any:
    """``value`` as JSON types; NaN and infinities become None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` (dataclasses, paths and numpy values allowed) as indented JSON, atomically.

    A NaN or infinite number is written as ``null``: the file is always valid (strict) JSON.
    """
    text = json.dumps(jsonable(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    with atomic_write(path, "w") as handle:
        handle.write(text)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | Path, expect: type | None = None) -> Any:
    """Read a strict JSON file (``NaN``/``Infinity`` refused); with ``expect`` (dict, list) its top level
    must be of that type.  A missing, malformed or mistyped file is a :class:`WsssError` naming it.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except FileNotFoundError:
        raise WsssError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise WsssError(f"{path}: is a folder, expected a JSON file") from None
    except OSError as err:
        raise WsssError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:  # also UnicodeDecodeError
        raise WsssError(f"{path}: not a valid JSON file ({err})") from None
    if expect is not None and not isinstance(data, expect):
        kinds = {dict: "an object {...}", list: "a list [...]"}
        raise WsssError(f"{path}: expected {kinds.get(expect, expect.__name__)} at the top level of the JSON, "
                        f"got {type(data).__name__}")
    return data


def provenance(config: Any, **extra: Any) -> dict:
    """Return the ``config.json`` content: resolved options, versions, command line, time."""
    from wsss import __version__

    versions = {"wsss": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for module in ("torch", "torchvision", "sklearn", "cv2"):
        if module in sys.modules:
            versions[module] = str(getattr(sys.modules[module], "__version__", "unknown"))  # torch's is no plain str
    return {
        "config": jsonable(config),
        "versions": versions,
        "command": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **jsonable(extra),
    }


def write_config(folder: str | Path, config: Any, shard: tuple[int, int] | None = None, **extra: Any) -> None:
    """Write ``<folder>/config.json`` from a stage config (see :func:`provenance`)."""
    write_json(config_path(folder, shard), provenance(config, **extra))


def previous_config(folder: str | Path, shard: tuple[int, int] | None = None) -> dict | None:
    """The ``config.json`` an earlier run left in ``folder``, or None when there is none or it cannot be read
    (a stage then writes it anew, as it redoes damaged outputs).  Stages compare it with their settings
    before resuming into the folder."""
    path = config_path(folder, shard)
    if not path.is_file():
        return None
    try:
        return read_json(path, dict)
    except WsssError:
        return None


def write_metrics(folder: str | Path, metrics: dict, shard: tuple[int, int] | None = None) -> None:
    """Write ``<folder>/metrics.json``."""
    write_json(metrics_path(folder, shard), metrics)


# --------------------------------------------------------------------------- images and label maps

def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 [H, W, 3]; a missing or corrupt file is a WsssError."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise WsssError(f"{path}: image not found")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise WsssError(f"{path}: cannot read image ({err.strerror or err})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise WsssError(f"{path}: not a readable image (corrupt or unsupported format)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


#: Files :func:`find_images` takes from a folder (any case); OpenCV decodes them.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def find_images(paths: Sequence[str | Path], skip: str | Path | None = None) -> dict[str, Path]:
    """Image files of ``paths`` (files, or folders searched recursively), by id: in the order given, each
    folder's files in sorted order.

    A file given directly has its name without suffix as id; a file found in a folder has its
    path relative to that folder without suffix (``street/cat``).  Hidden files and folders, and
    everything under ``skip`` (an output folder inside an input folder), are left out.

    Raises:
        WsssError: a path does not exist, a folder holds no image, or two files would get the same id.
    """
    found: dict[str, Path] = {}
    skip = Path(skip).resolve() if skip is not None else None
    for given in map(Path, paths):
        if given.is_file():
            candidates = [(given.stem, given)]
        elif given.is_dir():
            candidates = []
            for file in sorted(given.rglob("*")):
                relative = file.relative_to(given)
                if (file.suffix.lower() in IMAGE_SUFFIXES and file.is_file()
                        and not any(part.startswith(".") for part in relative.parts)
                        and not (skip is not None and file.resolve().is_relative_to(skip))):
                    candidates.append((relative.with_suffix("").as_posix(), file))
            if not candidates:
                raise WsssError(f"{given}: no images ({' '.join(IMAGE_SUFFIXES)}) in this folder")
        else:
            raise WsssError(f"{given}: no such file or folder")
        for image_id, file in candidates:
            if image_id in found and found[image_id].resolve() != file.resolve():
                raise WsssError(f"{file}: has the id {image_id!r} of {found[image_id]} (their label maps would be "
                                "one file); rename one or predict them into different --out folders")
            found[image_id] = file
    return found


def write_image(path: str | Path, image: np.ndarray, quality: int = 95) -> None:
    """Write an RGB uint8 [H, W, 3] image as JPEG or PNG (by suffix), atomically."""
    import cv2

    path = Path(path)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(path.suffix, cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise WsssError(f"{path}: could not encode image")
    with atomic_write(path) as handle:
        handle.write(encoded.tobytes())


def voc_palette() -> np.ndarray:
    """Return the PASCAL VOC colour palette, uint8 [256, 3] (index 255 is the cream ignore colour)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def write_label_png(path: str | Path, label: np.ndarray) -> None:
    """Write a label map uint8 [H, W] (0 = background, 255 = ignore) as a VOC palette PNG."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be [H, W], got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError("label values must lie in 0..255")
        label = label.astype(np.uint8)
    image = Image.fromarray(label, mode="P")
    image.putpalette(voc_palette().reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


_PIL_LIMIT = threading.Lock()


@contextlib.contextmanager
def open_image_file(path: str | Path) -> Iterator[Image.Image]:
    """``PIL.Image.open`` without PIL's decompression-bomb limit (89 MP warns, 179 MP refuses): label
    maps and photos of any size are this project's data, not an attack.  The limit is PIL's global,
    lifted only while opening, under a lock."""
    with _PIL_LIMIT:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    with image:
        yield image


def read_label_png(path: str | Path, num_classes: int | None = None) -> np.ndarray:
    """Read a label PNG (palette or greyscale) as uint8 [H, W] of class indices.

    Args:
        num_classes: when given, every value must be a class index ``0 .. num_classes - 1`` or 255.
    """
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"{path}: label map not found")
    try:
        with open_image_file(path) as image:
            if image.mode not in ("P", "L"):
                raise WsssError(f"{path}: label map must be a palette or greyscale PNG, got mode {image.mode}")
            label = np.array(image, dtype=np.uint8)
    except WsssError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as err:
        raise WsssError(f"{path}: not a readable label PNG ({err})") from None
    if label.ndim != 2:
        raise WsssError(f"{path}: label map has shape {label.shape}; expected [H, W]")
    if num_classes is not None:
        bad = (label >= num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise WsssError(f"{path}: label map holds class index {int(label[bad].max())}; the dataset's classes "
                            f"are 0..{num_classes - 1} (and 255 = ignore)")
    return label


# --------------------------------------------------------------------------- CAMs

def write_cam(path: str | Path, keys: np.ndarray, cams: np.ndarray) -> None:
    """Write a CAM file: ``keys`` int [K] class indices (>= 1), ``cams`` float [K, H, W] in [0, 1].

    Raises:
        WsssError: the CAMs hold NaN or infinity (a classifier with non-finite weights).
    """
    keys = np.asarray(keys)
    cams = np.asarray(cams)
    if cams.ndim != 3 or keys.ndim != 1 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"expected keys [K] and cams [K, H, W], got {keys.shape} and {cams.shape}")
    if keys.size and keys.min() < 1:
        raise ValueError("CAM keys are class indices of foreground classes (>= 1)")
    if not np.isfinite(cams).all():
        raise WsssError(f"{path}: the CAMs hold NaN or infinite values (does the classifier checkpoint hold "
                        "non-finite weights?); nothing written")
    buffer = io.BytesIO()
    np.savez(buffer, keys=keys.astype(np.int16), cams=cams.astype(np.float16))
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def read_cam(path: str | Path, allow_pickle: bool = False,
             num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a CAM file and return ``(keys int64 [K], cams float32 [K, H, W])``, checked.

    ``.npz`` files are this project's format.  ``.npy`` files are IRN-style
    pickled dicts (``keys`` over the foreground classes counted from 0,
    ``high_res`` [K, H, W]) and are opened only when ``allow_pickle`` is True,
    because unpickling runs code from the file.

    Args:
        num_classes: when given, every key must be a foreground class index ``1 .. num_classes - 1``.

    Raises:
        WsssError: naming the file, when it is missing, empty, truncated or not a CAM file, when
            ``keys`` is not an integer [K] without repeats or ``cams`` not a float [K, H, W], when a
            value is not finite or outside [0, 1], or a key is not a class index.
    """
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"{path}: CAM file not found")
    if path.suffix == ".npy":
        keys, cams = _read_irn_cam(path, allow_pickle)
    else:
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            with data:
                missing = {"keys", "cams"} - set(data.files)
                if missing:
                    raise ValueError(f"no {' or '.join(sorted(missing))} array")
                keys, cams = data["keys"], data["cams"]
        except _ARRAY_FILE_ERRORS as err:
            reason = "empty file" if path.stat().st_size == 0 else (str(err) or type(err).__name__)
            raise WsssError(f"{path}: not a valid CAM file ({reason}); delete it or rerun make-cam") from None
        if not np.issubdtype(keys.dtype, np.integer) or not np.issubdtype(cams.dtype, np.floating):
            raise WsssError(f"{path}: CAM arrays have dtypes keys {keys.dtype}, cams {cams.dtype}; "
                            "expected integer keys and float cams")
    if cams.ndim != 3 or keys.ndim != 1 or cams.shape[0] != keys.shape[0]:
        raise WsssError(f"{path}: CAM arrays have shapes keys {keys.shape}, cams {cams.shape}; expected [K] and [K, H, W]")
    keys, cams = keys.astype(np.int64), cams.astype(np.float32)
    if keys.size and (keys.min() < 1 or (num_classes is not None and keys.max() >= num_classes)):
        limit = f"1..{num_classes - 1}" if num_classes is not None else ">= 1"
        raise WsssError(f"{path}: CAM keys {keys.tolist()} are not the dataset's foreground class indices ({limit})")
    if len(set(keys.tolist())) != keys.size:
        raise WsssError(f"{path}: CAM keys {keys.tolist()} repeat a class")
    if cams.size:
        if not np.isfinite(cams).all():
            raise WsssError(f"{path}: CAMs hold NaN or infinite values")
        low, high = float(cams.min()), float(cams.max())
        if low < -_CAM_TOLERANCE or high > 1 + _CAM_TOLERANCE:
            raise WsssError(f"{path}: CAM values span [{low:.4g}, {high:.4g}]; "
                            "expected max-normalised values in [0, 1]")
    return keys, cams


def _read_irn_cam(path: Path, allow_pickle: bool) -> tuple[np.ndarray, np.ndarray]:
    if not allow_pickle:
        raise WsssError(
            f"{path}: IRN-style .npy CAM dicts are pickles (loading runs code from the file); "
            "pass --allow-pickle if you trust it"
        )
    try:
        data = np.load(path, allow_pickle=True).item()
        keys = np.asarray(data["keys"])
        cams = np.asarray(data["high_res"], dtype=np.float32)
        if not np.issubdtype(keys.dtype, np.integer) and keys.size:
            raise ValueError(f"keys have dtype {keys.dtype}")
        keys = keys.astype(np.int64)
    except Exception as err:  # unpickling a foreign file can raise any type
        raise WsssError(f"{path}: not an IRN-style CAM dict with 'keys' and 'high_res' "
                        f"({str(err) or type(err).__name__})") from None
    # IRN counts foreground classes from 0 and sometimes stores the background plane as key 0 first.
    if cams.ndim == 3 and keys.ndim == 1 and cams.shape[0] == keys.shape[0] + 1:
        cams = cams[1:]
    keys = keys + 1
    return keys, cams


def cam_is_complete(path: str | Path, num_classes: int | None = None) -> bool:
    """True if ``path`` is a valid CAM file (resume skips it); False for a missing or unreadable one."""
    try:
        read_cam(path, num_classes=num_classes)
    except WsssError:
        return False
    return True


# --------------------------------------------------------------------------- reliability maps

def write_reliability(path: str | Path, reliability: np.ndarray) -> None:
    """Write a reliability map float [H, W] (finite, >= 0) as plain float16 ``.npy`` (no pickle)."""
    reliability = np.asarray(reliability)
    if reliability.ndim != 2:
        raise ValueError(f"reliability map must be [H, W], got shape {reliability.shape}")
    if not np.isfinite(reliability).all():
        raise WsssError(f"{path}: the reliability map holds NaN or infinite values; nothing written")
    buffer = io.BytesIO()
    np.save(buffer, reliability.astype(np.float16), allow_pickle=False)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def read_reliability(path: str | Path) -> np.ndarray:
    """Read a reliability map as float32 [H, W] (finite, >= 0)."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise WsssError(f"{path}: reliability map not found") from None
    except _ARRAY_FILE_ERRORS as err:
        reason = "empty file" if path.is_file() and path.stat().st_size == 0 else (str(err) or type(err).__name__)
        raise WsssError(f"{path}: not a plain .npy reliability map ({reason})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise WsssError(f"{path}: reliability map has shape {getattr(array, 'shape', None)}; expected [H, W]")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise WsssError(f"{path}: reliability map has dtype {array.dtype}; expected float")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise WsssError(f"{path}: reliability map holds NaN or infinite values")
    if array.size and array.min() < 0:
        raise WsssError(f"{path}: reliability map holds negative weights (min {float(array.min()):.4g})")
    return array


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Save a checkpoint dict with ``torch.save``, atomically."""
    import torch

    required = {"model", "config", "classes", "arch"}
    missing = required - set(checkpoint)
    if missing:
        raise ValueError(f"checkpoint is missing {sorted(missing)}")
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict on the CPU with ``weights_only=True`` (no arbitrary unpickling), checked.

    Raises:
        WsssError: naming the file, when it is missing, unreadable, not a wsss checkpoint (a dict
            with a ``model`` state dict of tensors, an ``arch`` dict and a ``classes`` list), or
            holds NaN or infinite weights.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WsssError(f"{path}: checkpoint not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        first = (str(err).strip().splitlines() or [""])[0]
        raise WsssError(f"{path}: not a readable wsss checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise WsssError(f"{path}: not a wsss checkpoint (no 'model' state dict; a bare state dict goes to "
                        "--weights, not --checkpoint)")
    missing = [key for key, kind in (("arch", dict), ("classes", list)) if not isinstance(checkpoint.get(key), kind)]
    if missing:
        raise WsssError(f"{path}: not a wsss checkpoint (no {' or '.join(repr(key) for key in missing)} entry)")
    for name, tensor in checkpoint["model"].items():
        if not isinstance(tensor, torch.Tensor):
            raise WsssError(f"{path}: model entry {name!r} is not a tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WsssError(f"{path}: weight {name!r} holds NaN or infinite values (a diverged run); "
                            "use an earlier checkpoint or train again with a lower --lr")
    return checkpoint
