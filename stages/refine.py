"""``wsss refine``: CAMs -> pseudo-labels (palette PNG) + RAW reliability maps, with GMM threshold and dense CRF.

For every image of the split the CAM file ``<cams>/<id>.npz`` (IRN-style
``<id>.npy`` only with ``--allow-pickle``) is turned into ``<out>/<id>.png``
(0 background, class index, 255 ignore) and ``<out>/<id>.npy`` (float16 RAW
weights, mean 1 over labelled pixels) by :func:`wsss.refine.refine_image`.

Images are processed by a pool of ``--workers`` processes; each worker reads
its own CAM file and image, writes its own outputs and returns only a few
numbers, so memory does not grow with the dataset.  Each image's seed is derived
from ``--seed`` and its id (CRC-32), so the outputs do not depend on the number
of workers or the order of work.  Finished images are skipped unless
``--overwrite`` (their statistics are recomputed from the CAM without the CRF,
which is cheap).  ``metrics.json`` holds the distribution of the thresholds,
the fallback counts per reason, the ignore ratio and, with ``--eval``, the
pseudo-label mIoU against the split's ground truth.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from wsss.stages.options import (allow_pickle_setting, cams_setting, dataset_setting, device_setting, folder_problem,
                                 limit_setting, overwrite_setting, pool_workers_setting, root_setting, seed_setting,
                                 settings_command, shard_setting)
from wsss import artifacts
from wsss.crf import PSEUDO_LABEL_CRF, CrfParams
from wsss.datasets.prepared import PreparedDataset
from wsss.errors import WsssError
from wsss.gmm import FALLBACK_REASONS, GmmParams
from wsss.parallel import imap_images
from wsss.refine import (THRESHOLD_MODES, RefineParams, SplitFits, image_seed, image_thresholds, pooled_fits,
                         refine_image)
from wsss.settings import Settings, option_for, setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineConfig(Settings):
    """Options of ``wsss refine`` (see ``wsss refine --help``); the per-image ones default to
    :class:`~wsss.refine.RefineParams`'s, and :attr:`params` builds that from them."""

    cam_dir: Path = cams_setting()
    root: Path = root_setting()
    out_dir: Path = setting(help="Output folder for <id>.png pseudo-labels, <id>.npy reliability maps, config.json, "
                                 "metrics.json.", option="--out", validate=folder_problem)
    dataset: str | None = dataset_setting()
    split: str = setting("train", "Split to refine (pseudo-label quality is conventionally measured on VOC train).")
    threshold: str = setting(RefineParams.threshold, "Background threshold: a Gaussian mixture of the scores pooled "
                                                     "over the split (gmm), fitted per image (gmm-image), or the "
                                                     "fixed --bg-thresh.", choices=THRESHOLD_MODES)
    bg_thresh: float = setting(RefineParams.bg_thresh, "Fixed background threshold; also the GMM's fallback on "
                                                       "degenerate images.", above=0, below=1)
    fg_thresh: float | None = setting(None, "With --threshold fixed: confident foreground threshold; pixels between "
                                            "--bg-thresh and --fg-thresh become 255 (IRN uses 0.30/0.05).",
                                      above=0, below=1)
    gmm_per_class: bool = setting(RefineParams.gmm_per_class, "One mixture per class (on that class's CAMs; a class "
                                  f"in fewer than {RefineParams.gmm_min_images} images uses the overall one) or one on "
                                  "the max over classes.", flag="--gmm-per-class/--gmm-overall")
    gmm_samples: int = setting(GmmParams.max_samples, "Scores (seeded subsample) per GMM fit; pooled over the split "
                                                      "with --threshold gmm.", at_least=100)
    gmm_components: int = setting(GmmParams.components, "Gaussian components; the threshold lies between the two "
                                                        "upper ones.", at_least=2, at_most=8)
    confidence: float = setting(RefineParams.confidence, "GMM posterior below this -> 255 (0 = off; e.g. 0.9 hides "
                                                         "the unsure band).", at_least=0, below=1)
    crf: bool = setting(False, "Refine the labels with a dense CRF (the --crf-* options).")
    crf_params: CrfParams = setting(factory=lambda: PSEUDO_LABEL_CRF, prefix="crf",
                                    help="Dense-CRF settings of --crf (IRN's and SEAM's values).")
    crf_temperature: float = setting(RefineParams.unary_temperature, "T in the CRF unary softmax([0, cam - "
                                     "threshold] / T); lower trusts the CAM more.", above=0)
    raw_alpha: float = setting(RefineParams.lambda_alpha, "RAW lambda_alpha.", above=0, below=1)
    raw_beta: float = setting(RefineParams.lambda_beta, "RAW lambda_beta (perplexity exponent).", above=0)
    random_walk: Path | None = setting(None, "A `wsss train-aff` output folder (or checkpoint): first spread the CAMs "
                                             "over its learned affinities (written to <out>/walked/), then threshold "
                                             "(and CRF) the walked CAMs.")
    rw_beta: float = setting(8.0, "Affinities are raised to this power before the walk (AffinityNet 8, IRN 10).",
                             above=0)
    rw_steps: int = setting(256, "Random-walk steps (AffinityNet: 256 = 2^8).", at_least=1)
    device: str = device_setting(" Only --random-walk uses it.")
    limit: int | None = limit_setting()
    evaluate: bool = setting(False, "Score the pseudo-labels against ground truth afterwards.", option="--eval")
    allow_pickle: bool = allow_pickle_setting()
    workers: int | None = pool_workers_setting()
    seed: int = seed_setting()
    shard: tuple[int, int] = shard_setting()
    overwrite: bool = overwrite_setting()
    progress: bool = setting(True, "Show progress bars.")

    def check(self) -> None:
        """--fg-thresh needs --threshold fixed and must not be below --bg-thresh.

        Those rules are :class:`~wsss.refine.RefineParams`' own: building it checks them, and its errors
        name these options.
        """
        _ = self.params

    @property
    def params(self) -> RefineParams:
        """The per-image settings of :func:`wsss.refine.refine_image` (the CRF's only with ``crf``)."""
        return RefineParams(threshold=self.threshold, bg_thresh=self.bg_thresh, fg_thresh=self.fg_thresh,
                            gmm_per_class=self.gmm_per_class, confidence=self.confidence,
                            gmm=GmmParams(components=self.gmm_components, fallback_threshold=self.bg_thresh,
                                          max_samples=self.gmm_samples),
                            crf=self.crf_params if self.crf else None, unary_temperature=self.crf_temperature,
                            lambda_alpha=self.raw_alpha, lambda_beta=self.raw_beta)


def _is_done(out_dir: Path, image_id: str, num_classes: int | None = None) -> bool:
    """True when both outputs exist, are valid and agree in shape (anything unreadable is redone)."""
    try:
        label = artifacts.read_label_png(artifacts.label_path(out_dir, image_id), num_classes)
        reliability = artifacts.read_reliability(artifacts.reliability_path(out_dir, image_id))
    except WsssError:
        return False
    return label.shape == reliability.shape


# --------------------------------------------------------------------------- per-image work (runs in workers)

def _read_inputs(cfg: RefineConfig, dataset: PreparedDataset, image_id: str):
    cam_file = artifacts.find_cam(cfg.cam_dir, image_id)
    if cam_file is None:
        raise WsssError(f"{artifacts.cam_path(cfg.cam_dir, image_id)}: CAM file not found")
    keys, cams = artifacts.read_cam(cam_file, allow_pickle=cfg.allow_pickle, num_classes=dataset.num_classes)
    return cam_file, keys, cams


def process_image(cfg: RefineConfig, dataset: PreparedDataset, image_id: str,
                  split_fits: SplitFits | None = None) -> dict:
    """Refine one image (or, if finished and not ``overwrite``, recompute its statistics).

    Returns:
        ``{"id", "skipped", **info}`` with the small ``info`` dict of :func:`refine_image`.
    """
    from threadpoolctl import threadpool_limits

    seed = image_seed(cfg.seed, image_id)
    # one BLAS/OpenMP thread per image: the arrays are small, processes give the parallelism,
    # and the numbers do not depend on how many threads a machine has
    with threadpool_limits(limits=1):
        cam_file, keys, cams = _read_inputs(cfg, dataset, image_id)
        if not cfg.overwrite and _is_done(cfg.out_dir, image_id, dataset.num_classes):
            label = artifacts.read_label_png(artifacts.label_path(cfg.out_dir, image_id))
            if label.shape != cams.shape[1:]:
                raise WsssError(f"{artifacts.label_path(cfg.out_dir, image_id)}: finished pseudo-label is "
                                f"{label.shape[1]}x{label.shape[0]} but {cam_file} is {cams.shape[2]}x{cams.shape[1]}; "
                                "pass --overwrite")
            info = image_thresholds(keys, cams, cfg.params, seed=seed, split_fits=split_fits).summary(label)
            return {"id": image_id, "skipped": True, **info}
        image = dataset.read_image(cfg.split, image_id)
        if image.shape[:2] != cams.shape[1:]:
            raise WsssError(f"{cam_file}: CAM is {cams.shape[2]}x{cams.shape[1]} but the image "
                            f"{dataset.image_path(cfg.split, image_id)} is {image.shape[1]}x{image.shape[0]}")
        try:
            label, reliability, info = refine_image(image, keys, cams, cfg.params, seed=seed, split_fits=split_fits)
        except ValueError as err:
            raise WsssError(f"{cam_file}: {err}") from None
    artifacts.write_reliability(artifacts.reliability_path(cfg.out_dir, image_id), reliability)
    artifacts.write_label_png(artifacts.label_path(cfg.out_dir, image_id), label)
    return {"id": image_id, "skipped": False, **info}


_WORKER_STATE: dict = {}


def _init_worker(cfg: RefineConfig, dataset: PreparedDataset, split_fits: SplitFits | None) -> None:
    _WORKER_STATE.update(cfg=cfg, dataset=dataset, split_fits=split_fits)


def _worker_process(image_id: str) -> dict:
    return process_image(_WORKER_STATE["cfg"], _WORKER_STATE["dataset"], image_id, _WORKER_STATE["split_fits"])


def fit_split_thresholds(cfg: RefineConfig, ids: list[str], workers: int, num_classes: int) -> SplitFits | None:
    """The pooled mixtures of ``threshold="gmm"`` (None for other modes) from every CAM of the split,
    so that every ``--shard`` fits the same sample."""
    if cfg.params.threshold != "gmm":
        return None
    files = {image_id: artifacts.find_cam(cfg.cam_dir, image_id) for image_id in ids}
    return pooled_fits(files, cfg.params, seed=cfg.seed, workers=workers, allow_pickle=cfg.allow_pickle,
                       num_classes=num_classes, progress=cfg.progress)


def _run_all(cfg: RefineConfig, dataset: PreparedDataset, ids: list[str], workers: int,
             split_fits: SplitFits | None = None) -> list[dict]:
    """Refine ``ids`` over ``workers`` processes; results in the order of ``ids``.

    The config and the dataset (COCO's label table is large) reach each worker once, through the
    pool initializer, not with every image; small chunks keep the slow CRF images balanced.
    """
    chunksize = max(1, min(8, math.ceil(len(ids) / (8 * workers))))
    results = list(imap_images(_worker_process, ids, workers, f"refine {cfg.split}", initializer=_init_worker,
                               initargs=(cfg, dataset, split_fits), ordered=False, chunksize=chunksize,
                               show=cfg.progress,
                               leave=True))
    order = {image_id: index for index, image_id in enumerate(ids)}
    return sorted(results, key=lambda result: order[result["id"]])


# --------------------------------------------------------------------------- metrics

def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    array = np.asarray(values, dtype=np.float64)
    p25, median, p75 = np.percentile(array, [25, 50, 75])
    return {"count": int(array.size), "min": round(float(array.min()), 6), "p25": round(float(p25), 6),
            "median": round(float(median), 6), "p75": round(float(p75), 6), "max": round(float(array.max()), 6),
            "mean": round(float(array.mean()), 6)}


def summarise(results: list[dict], params: RefineParams, split_fits: SplitFits | None = None) -> dict:
    """Aggregate per-image info into the ``metrics.json`` sections (thresholds, fallbacks, ignore).

    With pooled fits (``--threshold gmm``) the fits and their fallbacks are the split's, counted once.
    """
    thresholds = [t for result in results for t in result["thresholds"]]
    fits = sum(result["fits"] for result in results)
    by_reason = dict.fromkeys(FALLBACK_REASONS, 0)
    reasons = [reason for result in results for reason in result["fallbacks"]]
    if split_fits is not None:
        pooled = [split_fits.overall, *split_fits.per_class.values()]
        fits += len(pooled)
        reasons += [fit.fallback for fit in pooled if fit.fallback is not None]
    for reason in reasons:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    total_fallbacks = sum(by_reason.values())
    pixels = sum(result["pixels"] for result in results)
    ignored = sum(result["ignore_ratio"] * result["pixels"] for result in results)
    per_image_ignore = [result["ignore_ratio"] for result in results]
    return {
        "threshold": {"mode": params.threshold, "per_class": params.gmm_per_class, "fits": fits,
                      **_quantiles(thresholds)},
        "fallbacks": {"total": total_fallbacks, "rate": round(total_fallbacks / fits, 6) if fits else 0.0,
                      "fallback_value": params.bg_thresh, "by_reason": by_reason},
        "ignore_ratio": {"pixels": round(ignored / pixels, 6) if pixels else 0.0,
                         "per_image": _quantiles(per_image_ignore)},
        "foreground_ratio": round(sum(r["foreground_ratio"] * r["pixels"] for r in results) / pixels, 6)
        if pixels else 0.0,
    }


def evaluate_pseudo_labels(dataset: PreparedDataset, split: str, out_dir: Path, ids: list[str],
                           workers: int | None, progress: bool = True) -> dict:
    """Pseudo-label quality: mIoU with 255 as background, and on labelled pixels only.

    Returns:
        ``{"miou", "miou_labelled", "precision_labelled", "ignore_share", "summary"}``:
        ``miou`` counts 255 as background (comparable with CAM mIoU);
        ``miou_labelled`` and ``precision_labelled`` (pixel accuracy) leave 255 out;
        ``ignore_share`` is the share of labelled ground-truth pixels marked 255.
    """
    from wsss.evaluation import evaluate_labels

    as_background = evaluate_labels(dataset, split, out_dir, ids=ids, ignore_pred=False, workers=workers,
                                    progress=progress)
    labelled = evaluate_labels(dataset, split, out_dir, ids=ids, ignore_pred=True, workers=workers,
                               progress=progress)

    def clean(value: float) -> float | None:
        return None if value != value else round(float(value), 6)

    return {"miou": clean(as_background.miou()), "miou_labelled": clean(labelled.miou()),
            "precision_labelled": clean(labelled.pixel_accuracy()), "ignore_share": clean(1.0 - labelled.coverage()),
            "summary": as_background.summary(dataset.classes), "table": as_background.table(dataset.classes)}


# --------------------------------------------------------------------------- stage

def _params_json(params: RefineParams) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(params)))


# RefineParams fields (nested ones dotted) that are set from a RefineConfig field of another name (see
# RefineConfig.params), for messages; "crf.x" is the CRF group's own x
_PARAM_FIELDS = {"gmm.fallback_threshold": "bg_thresh", "gmm.max_samples": "gmm_samples",
                 "gmm.components": "gmm_components", "unary_temperature": "crf_temperature",
                 "lambda_alpha": "raw_alpha", "lambda_beta": "raw_beta"}


def _flat(params: dict, prefix: str = "") -> dict:
    """``{"crf": {"scale": 1.0}}`` -> ``{"crf": "on", "crf.scale": 1.0}`` (``crf`` None: ``{"crf": None}``)."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat[prefix + key] = "on"
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _changed_options(previous: dict, current: dict) -> list[str]:
    """The options whose values differ between two ``RefineParams`` dicts, e.g. ``["--bg-thresh", "--crf"]``."""
    previous, current = _flat(previous), _flat(current)
    changed = {key for key in set(previous) | set(current) if previous.get(key) != current.get(key)}
    # a section switched on or off (the CRF) is one change, not one per setting inside it
    changed = {key for key in changed if key.rpartition(".")[0] not in changed}
    return sorted({_option_of(key) for key in changed})


def _option_of(key: str) -> str:
    section, _, field = key.rpartition(".")
    if key in _PARAM_FIELDS:
        return option_for(RefineConfig, _PARAM_FIELDS[key])
    if section == "crf":
        return option_for(RefineConfig, field, group="crf_params")  # crf.iterations -> --crf-iterations
    if not section and key in {item.name for item in dataclasses.fields(RefineConfig)}:
        return option_for(RefineConfig, key)
    return key  # a rule without an option (gmm.min_score, gmm_min_images) keeps its name


def _check_previous_run(cfg: RefineConfig) -> None:
    """Refuse to resume into a folder made with other per-image settings (the files would mix)."""
    previous = None if cfg.overwrite else artifacts.previous_config(cfg.out_dir, cfg.shard)
    if previous is None:
        return
    # config.json holds the per-image settings beside the options (runs before the options were flat: inside)
    params = previous.get("params", (previous.get("config") or {}).get("params"))
    if not isinstance(params, dict):
        return  # a config.json without the settings: nothing to compare
    if params != _params_json(cfg.params):
        changed = _changed_options(params, _params_json(cfg.params))
        path = artifacts.config_path(cfg.out_dir, cfg.shard)
        raise WsssError(f"{path}: {cfg.out_dir} was refined with other settings ({', '.join(changed)}); "
                        "pass --overwrite or choose another --out")


WALKED_DIR = "walked"


def _walk(cfg: RefineConfig, dataset: PreparedDataset, ids: list[str], network) -> RefineConfig:
    """Random-walk the CAMs of ``ids`` into ``<out>/walked/`` (:func:`wsss.affinity.walk_split`); return the
    config that refines those walked CAMs."""
    from wsss.affinity import walk_split
    from wsss.device import resolve_device

    folder = walk_split(network, dataset, cfg.split, ids, cfg.cam_dir, Path(cfg.out_dir) / WALKED_DIR,
                        beta=cfg.rw_beta, steps=cfg.rw_steps, device=resolve_device(cfg.device),
                        allow_pickle=cfg.allow_pickle, overwrite=cfg.overwrite, progress=cfg.progress)
    return cfg.replace(cam_dir=folder, allow_pickle=False)


def _split_ids(cfg: RefineConfig, dataset: PreparedDataset) -> list[str]:
    """The ids to refine (``--limit``), all with a CAM file that may be opened; checked before any work."""
    ids = list(dataset.ids(cfg.split))[:cfg.limit]
    if not ids:
        raise WsssError(f"{cfg.root}: split {cfg.split!r} has no images")
    artifacts.require_cams(cfg.cam_dir, ids, cfg.split, cfg.allow_pickle)
    return ids


def run(cfg: RefineConfig) -> dict:
    """Refine every image of the split and return the metrics written to ``<out>/metrics.json``."""
    from wsss.device import default_workers, shard

    cam_dir, out_dir = Path(cfg.cam_dir), Path(cfg.out_dir)
    if cfg.evaluate and cfg.shard[1] > 1:
        raise WsssError("--eval scores the whole split: run `wsss eval --pred` once every --shard has finished")
    if out_dir.resolve() == cam_dir.resolve():
        raise WsssError(f"{out_dir}: --out must differ from --cams (reliability maps <id>.npy would mix with CAMs)")
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    split_ids = _split_ids(cfg, dataset)
    ids = shard(split_ids, part=cfg.shard)
    network = None
    if cfg.random_walk is not None:  # torch is imported for the walk only; its checkpoint is checked before any write
        from wsss.affinity import load_walk_network

        network = load_walk_network(cfg.random_walk)
    _check_previous_run(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = default_workers() if cfg.workers is None else max(1, cfg.workers)
    artifacts.write_config(out_dir, cfg, shard=cfg.shard, workers=workers, params=cfg.params)

    started = time.perf_counter()
    if cfg.random_walk is not None:
        # the pooled GMM fits every image of the split: walk them all, not only this shard's
        cfg = _walk(cfg, dataset, split_ids if cfg.threshold == "gmm" else ids, network)
    split_fits = fit_split_thresholds(cfg, split_ids, workers, dataset.num_classes)
    results = _run_all(cfg, dataset, ids, workers, split_fits)
    seconds = time.perf_counter() - started
    refined = sum(not result["skipped"] for result in results)
    if refined < len(results):
        log.info("skipped %d finished images (pass --overwrite to redo them)", len(results) - refined)
    metrics = {"split": cfg.split, "num_images": len(ids), "refined": refined, "skipped": len(results) - refined,
               "workers": workers, "crf": cfg.crf, "seconds": round(seconds, 3),
               "images_per_second": round(refined / seconds, 3) if refined and seconds > 0 else None,
               **summarise(results, cfg.params, split_fits)}
    if split_fits is not None:
        metrics["split_fit"] = split_fits.as_json(dataset.classes)
    if cfg.evaluate:
        if dataset.has_masks(cfg.split):
            report = evaluate_pseudo_labels(dataset, cfg.split, out_dir, ids, workers, cfg.progress)
            log.info("pseudo-labels %s\n%s", cfg.split, report.pop("table"))
            metrics["eval"] = report
        else:
            log.warning("--eval: split %r of %s has no ground-truth masks; nothing to evaluate", cfg.split, cfg.root)
            metrics["eval"] = None
    artifacts.write_metrics(out_dir, metrics, shard=cfg.shard)
    return metrics


# --------------------------------------------------------------------------- command line


@settings_command(RefineConfig, name="refine")
def command(cfg: RefineConfig) -> None:
    """Turn CAMs into pseudo-labels (<id>.png) and RAW reliability maps (<id>.npy)."""
    metrics = run(cfg)
    threshold = metrics["threshold"]
    click.echo(f"{metrics['refined']} refined, {metrics['skipped']} skipped -> {cfg.out_dir}")
    if threshold.get("count"):
        click.echo(f"threshold median {threshold['median']:.3f} "
                   f"(p25 {threshold['p25']:.3f}, p75 {threshold['p75']:.3f}); "
                   f"fallbacks {metrics['fallbacks']['total']}/{threshold['fits']}; "
                   f"ignore {metrics['ignore_ratio']['pixels']:.3f}")
    if metrics.get("eval"):
        report = metrics["eval"]
        click.echo(f"{cfg.split} pseudo-label mIoU {report['miou']:.4f} (255 as background); labelled pixels: "
                   f"mIoU {report['miou_labelled']:.4f}, precision {report['precision_labelled']:.4f}, "
                   f"255 share {report['ignore_share']:.4f}")
