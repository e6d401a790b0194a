"""wsss: weakly supervised semantic segmentation from image-level labels.

The Python API (see README, "Python API"): :func:`load_model` (a trained network that segments
arrays and files), :func:`read_image`, :func:`read_cam` and :func:`evaluate`.  They live in :mod:`wsss.api` and are
imported on first use, so ``import wsss`` loads neither torch nor OpenCV.
"""

__version__ = "0.1.0"

_API = ("load_model", "read_image", "read_cam", "evaluate", "Segmenter")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from wsss import api

        return getattr(api, name)
    raise AttributeError(f"module 'wsss' has no attribute {name!r}")
