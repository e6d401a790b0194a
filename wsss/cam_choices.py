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
#: The score (sigmoid of a logit) from which an image counts as showing a class: multi-label classification's
#: decision threshold.  Adversarial erasing's stopping rule uses it in training: no loss asks the classifier to find
#: a class in an erased image or an equivariance view whose change removed the class's evidence
#: (:func:`wsss.losses.shown_classes_loss`, the default of ``--er-view-stop``; ``--erase-stop`` offers it).
SHOWN_SCORE = 0.5
#: The default ``--erase-stop`` of train-cls and make-cam: 0, erasing never stops.  At inference the rule at
#: SHOWN_SCORE gained nothing where CAMs are partial (parts: 33.4 against 33.3 without it) and lost 2.3 points where
#: they are not (shapes: 60.4 against 62.7); in training it was measured on one style only (parts: 39.0 against 38.2,
#: one seed), bench/partial_cams.md.
ERASE_STOP = 0.0
#: Input scales of multi-scale CAM inference.
DEFAULT_SCALES = (1.0, 0.5, 1.5, 2.0)

# CamObjective's choices: which branch the equivariance loss reaches, what fills erased pixels, and whose
# regions are erased (every present class, or one per image)
ER_TARGETS = ("detached", "both")
ERASE_FILLS = ("mean", "blur")
ERASE_CLASSES = ("all", "one")
