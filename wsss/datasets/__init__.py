"""Dataset readers (VOC, COCO, folder, demo) and torch datasets over prepared datasets."""

from wsss.datasets.prepared import PreparedDataset, SplitSpec, meta_dir, write_prepared

__all__ = ["PreparedDataset", "SplitSpec", "meta_dir", "write_prepared"]
