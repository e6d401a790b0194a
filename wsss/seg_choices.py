"""The defaults of segmentation inference, without torch.

``wsss predict`` offers them as options (and prints its ``--help`` without loading torch);
:class:`wsss.api.Segmenter` takes the same defaults from here, so that the Python API segments an
image as the command does.
"""

from __future__ import annotations

#: Test-time scales whose softmax probabilities are averaged (DeepLab's multi-scale inference).
PREDICT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
#: Also average the probabilities of the mirrored image.
PREDICT_FLIP = True
#: Longest side (pixels) the network sees at scale 1: a larger image is scaled down for it.  Networks are
#: trained on crops of a few hundred pixels (VOC and COCO images are at most 640 px, so unaffected).
MAX_SIDE = 1024
