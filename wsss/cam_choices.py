"""The choices and defaults of CAM training and inference, without torch.

``wsss train-cls`` and ``wsss make-cam`` offer them as options (and must print their ``--help``
without loading torch); :mod:`wsss.losses` (:class:`~wsss.losses.CamObjective`) and :mod:`wsss.cam`
(:func:`~wsss.cam.multiscale_cam`, :func:`~wsss.cam.erasing_cams`) take them from here.
"""

from __future__ import annotations

#: Erasing threshold: a class's pixels at or above this fraction of its CAM maximum are its discriminative
#: region (training-time erasing in :class:`wsss.losses.CamObjective`, inference-time in
#: :func:`wsss.cam.erasing_cams`).
ERASE_THRESH = 0.7
#: Input scales of multi-scale CAM inference.
DEFAULT_SCALES = (1.0, 0.5, 1.5, 2.0)

# CamObjective's choices: which branch the equivariance loss reaches, what fills erased pixels, and whose
# regions are erased (every present class, or one per image)
ER_TARGETS = ("detached", "both")
ERASE_FILLS = ("mean", "blur")
ERASE_CLASSES = ("all", "one")
