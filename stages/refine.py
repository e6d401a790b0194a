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
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from wsss.stages import options
from wsss import artifacts
from wsss.crf import PSEUDO_LABEL_CRF, CrfParams
from wsss.datasets.prepared import PreparedDataset
from wsss.errors import WsssError, option_name
from wsss.gmm import FALLBACK_REASONS, GmmParams
from wsss.parallel import imap_images
from wsss.progress import bar as progress_bar
from wsss.refine import RefineParams, SplitFits, image_seed, image_thresholds, pooled_fits, refine_image
from wsss.reliability import LAMBDA_ALPHA, LAMBDA_BETA

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RefineConfig:
    """Options of ``wsss refine`` (see ``wsss refine --help``).

    Attributes:
        cam_dir: folder of CAM files.
        root: prepared dataset root (images for the CRF, ids, masks for ``evaluate``).
        out_dir: output folder (PNG + NPY per image, config.json, metrics.json).
        params: the per-image settings.
        limit: only the first ``limit`` ids of the split (quick looks, benchmarks).
    """

    cam_dir: Path
    root: Path
    out_dir: Path
    dataset: str | None = None
    split: str = "train"
    params: RefineParams = field(default_factory=RefineParams)
    limit: int | None = None
    allow_pickle: bool = False
    evaluate: bool = False
    workers: int | None = None
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    random_walk: Path | None = None
    rw_beta: float = 8.0
    rw_steps: int = 256
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True


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


# RefineParams fields (nested ones dotted) whose option is not "--" + the field with dashes, for messages
_PARAM_OPTIONS = {"gmm.fallback_threshold": "--bg-thresh", "gmm.max_samples": "--gmm-samples",
                  "crf.gaussian_sxy": "--crf-gaussian", "crf.gaussian_compat": "--crf-gaussian",
                  "crf.bilateral_sxy": "--crf-bilateral", "crf.bilateral_srgb": "--crf-bilateral",
                  "crf.bilateral_compat": "--crf-bilateral", "unary_temperature": "--crf-temperature",
                  "lambda_alpha": "--raw-alpha", "lambda_beta": "--raw-beta"}


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
    if key in _PARAM_OPTIONS:
        return _PARAM_OPTIONS[key]
    section, _, field = key.rpartition(".")
    if section == "crf":
        return option_name(f"crf_{field}")  # crf.iterations -> --crf-iterations
    return key if section else option_name(key)  # a GMM rule without an option keeps its dotted name


def _check_previous_run(cfg: RefineConfig) -> None:
    """Refuse to resume into a folder made with other per-image settings (the files would mix)."""
    previous = None if cfg.overwrite else artifacts.previous_config(cfg.out_dir, cfg.shard)
    if previous is None:
        return
    try:
        params = previous["config"]["params"]
    except (KeyError, TypeError):
        return  # a config.json without the settings: nothing to compare
    if params != _params_json(cfg.params):
        changed = _changed_options(params, _params_json(cfg.params))
        path = artifacts.config_path(cfg.out_dir, cfg.shard)
        raise WsssError(f"{path}: {cfg.out_dir} was refined with other settings ({', '.join(changed)}); "
                        "pass --overwrite or choose another --out")


WALKED_DIR = "walked"


def load_walk_network(cfg: RefineConfig):
    """The affinity network of ``--random-walk`` (checked before anything is written) and its checkpoint."""
    from wsss.models.affinity import load_affinity_net

    checkpoint_file = artifacts.resolve_checkpoint(cfg.random_walk)
    checkpoint = artifacts.load_checkpoint(checkpoint_file)
    return load_affinity_net(checkpoint, str(checkpoint_file)), checkpoint, checkpoint_file


def walk_split(cfg: RefineConfig, dataset: PreparedDataset, ids: list[str], network) -> RefineConfig:
    """Random-walk the CAMs of ``ids`` into ``<out>/walked/`` (skipping finished ones); return the
    config that refines those walked CAMs.

    The walked CAMs are tied to the affinity checkpoint and the walk's settings: a folder made with
    others is refused (``--overwrite`` redoes it).
    """
    import torch

    from wsss.affinity import pair_offsets, walk_cams
    from wsss.device import resolve_device
    from wsss.inference import BackgroundWriter, split_batches, to_model_input

    folder = Path(cfg.out_dir) / WALKED_DIR
    model, checkpoint, checkpoint_file = network
    settings = {"checkpoint": str(checkpoint_file), "checkpoint_step": checkpoint.get("step"), "beta": cfg.rw_beta,
                "steps": cfg.rw_steps, "cams": str(cfg.cam_dir)}
    settings_file = artifacts.config_path(folder)
    if settings_file.is_file() and not cfg.overwrite and artifacts.read_json(settings_file) != settings:
        raise WsssError(f"{settings_file}: {folder} holds CAMs walked with other settings; pass --overwrite")
    artifacts.write_json(settings_file, settings)
    device = resolve_device(cfg.device)
    model = model.to(device)
    offsets = pair_offsets(int(checkpoint["arch"].get("radius", 5)))
    todo = [image_id for image_id in ids
            if cfg.overwrite or not artifacts.cam_is_complete(artifacts.cam_path(folder, image_id))]
    with progress_bar(total=len(todo), desc="random walk", show=cfg.progress) as bar, BackgroundWriter() as writer:
        for (image_id,), images, _ in split_batches(dataset, cfg.split, todo, batch_size=1, workers=0, device=device):
            keys, cams = artifacts.read_cam(artifacts.find_cam(cfg.cam_dir, image_id), allow_pickle=cfg.allow_pickle,
                                            num_classes=dataset.num_classes)
            walked = walk_cams(model, to_model_input(images)[0], torch.from_numpy(cams).to(device), offsets,
                               beta=cfg.rw_beta, steps=cfg.rw_steps)
            writer.submit(artifacts.write_cam, artifacts.cam_path(folder, image_id), keys, walked.cpu().numpy())
            bar.update(1)
    return dataclasses.replace(cfg, cam_dir=folder, allow_pickle=False)


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
    network = load_walk_network(cfg) if cfg.random_walk is not None else None
    _check_previous_run(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = default_workers() if cfg.workers is None else max(1, cfg.workers)
    artifacts.write_config(out_dir, cfg, shard=cfg.shard, workers=workers)

    started = time.perf_counter()
    if cfg.random_walk is not None:
        cfg = walk_split(cfg, dataset, split_ids if cfg.params.threshold == "gmm" else ids, network)
    split_fits = fit_split_thresholds(cfg, split_ids, workers, dataset.num_classes)
    results = _run_all(cfg, dataset, ids, workers, split_fits)
    seconds = time.perf_counter() - started
    refined = sum(not result["skipped"] for result in results)
    if refined < len(results):
        log.info("skipped %d finished images (pass --overwrite to redo them)", len(results) - refined)
    metrics = {"split": cfg.split, "num_images": len(ids), "refined": refined, "skipped": len(results) - refined,
               "workers": workers, "crf": cfg.params.crf is not None, "seconds": round(seconds, 3),
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


@click.command(short_help="CAMs -> pseudo-labels + reliability (GMM threshold, dense CRF).")
@options.cams_option()
@options.root_option()
@options.dataset_option()
@options.split_option("train", "Split to refine (pseudo-label quality is conventionally measured on VOC train).")
@options.out_option("Output folder for <id>.png pseudo-labels, <id>.npy reliability maps, config.json, metrics.json.")
@click.option("--threshold", "threshold_mode", type=click.Choice(["gmm", "gmm-image", "fixed"]), default="gmm",
              show_default=True, help="Background threshold: a Gaussian mixture of the scores pooled over the split "
                                      "(gmm), fitted per image (gmm-image), or the fixed --bg-thresh.")
@click.option("--bg-thresh", type=options.FiniteFloat(0, 1, min_open=True, max_open=True), default=0.20,
              show_default=True, help="Fixed background threshold; also the GMM's fallback on degenerate images.")
@click.option("--fg-thresh", type=options.FiniteFloat(0, 1, min_open=True, max_open=True), default=None,
              help="With --threshold fixed: confident foreground threshold; pixels between --bg-thresh and "
                   "--fg-thresh become 255 (IRN uses 0.30/0.05).")
@click.option("--gmm-per-class/--gmm-overall", default=RefineParams.gmm_per_class, show_default=True,
              help="One mixture per class (on that class's CAMs; a class in fewer than 10 images uses the overall "
                   "one) or one on the max over classes.")
@click.option("--gmm-samples", type=click.IntRange(min=100), default=GmmParams().max_samples, show_default=True,
              help="Scores (seeded subsample) per GMM fit; pooled over the split with --threshold gmm.")
@click.option("--gmm-components", type=click.IntRange(min=2, max=8), default=GmmParams().components,
              show_default=True, help="Gaussian components; the threshold lies between the two upper ones.")
@click.option("--confidence", type=options.FiniteFloat(0, 1, max_open=True), default=RefineParams.confidence,
              show_default=True, help="GMM posterior below this -> 255 (0 = off; e.g. 0.9 hides the unsure band).")
@click.option("--crf/--no-crf", default=False, show_default=True, help="Refine the labels with a dense CRF.")
@click.option("--crf-iterations", type=click.IntRange(min=1), default=PSEUDO_LABEL_CRF.iterations, show_default=True,
              help="Mean-field iterations.")
@click.option("--crf-gaussian", default="3,3", show_default=True,
              callback=options.fixed_floats(2, "SXY,COMPAT", positive=(0,)),
              help="Smoothness kernel SXY,COMPAT.")
@click.option("--crf-bilateral", default="50,5,10", show_default=True,
              callback=options.fixed_floats(3, "SXY,SRGB,COMPAT", positive=(0, 1)),
              help="Appearance kernel SXY,SRGB,COMPAT.")
@click.option("--crf-scale", type=options.FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True,
              help="Run the CRF at this fraction of the resolution (about 1/scale^2 faster).")
@click.option("--crf-temperature", type=options.FiniteFloat(0, min_open=True), default=1.0, show_default=True,
              help="T in the CRF unary softmax([0, cam - threshold] / T); lower trusts the CAM more.")
@click.option("--raw-alpha", type=options.FiniteFloat(0, 1, min_open=True, max_open=True), default=LAMBDA_ALPHA,
              show_default=True, help="RAW lambda_alpha (must stay in (0, 1)).")
@click.option("--raw-beta", type=options.FiniteFloat(0, min_open=True), default=LAMBDA_BETA, show_default=True,
              help="RAW lambda_beta (perplexity exponent).")
@click.option("--random-walk", "random_walk", type=click.Path(path_type=Path), default=None,
              help="A `wsss train-aff` output folder (or checkpoint): first spread the CAMs over its learned "
                   "affinities (written to <out>/walked/), then threshold (and CRF) the walked CAMs.")
@click.option("--rw-beta", type=options.FiniteFloat(0, min_open=True), default=8.0, show_default=True,
              help="Affinities are raised to this power before the walk (AffinityNet 8, IRN 10).")
@click.option("--rw-steps", type=click.IntRange(min=1), default=256, show_default=True,
              help="Random-walk steps (AffinityNet: 256 = 2^8).")
@options.device_option
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images of the split.")
@click.option("--eval", "evaluate", is_flag=True, help="Score the pseudo-labels against ground truth afterwards.")
@options.allow_pickle_option
@options.workers_option
@options.seed_option
@options.shard_option
@options.overwrite_option
def command(cam_dir, root, dataset, split, out_dir, threshold_mode, bg_thresh, fg_thresh, gmm_per_class, gmm_samples,
            gmm_components, confidence, crf, crf_iterations, crf_gaussian, crf_bilateral, crf_scale, crf_temperature,
            raw_alpha, raw_beta, random_walk, rw_beta, rw_steps, device, limit, evaluate, allow_pickle, workers, seed, shard,
            overwrite):
    """Turn CAMs into pseudo-labels (<id>.png) and RAW reliability maps (<id>.npy)."""
    if fg_thresh is not None and threshold_mode != "fixed":
        raise click.UsageError("--fg-thresh needs --threshold fixed (confident regions use two fixed thresholds)")
    if fg_thresh is not None and fg_thresh < bg_thresh:
        raise click.UsageError(f"--fg-thresh {fg_thresh} must not be below --bg-thresh {bg_thresh}")
    try:
        crf_params = CrfParams(iterations=crf_iterations, gaussian_sxy=crf_gaussian[0], gaussian_compat=crf_gaussian[1],
                               bilateral_sxy=crf_bilateral[0], bilateral_srgb=crf_bilateral[1],
                               bilateral_compat=crf_bilateral[2], scale=crf_scale) if crf else None
        params = RefineParams(threshold=threshold_mode, bg_thresh=bg_thresh, fg_thresh=fg_thresh,
                              gmm_per_class=gmm_per_class, confidence=confidence,
                              gmm=GmmParams(components=gmm_components, fallback_threshold=bg_thresh,
                                            max_samples=gmm_samples), crf=crf_params,
                              unary_temperature=crf_temperature, lambda_alpha=raw_alpha, lambda_beta=raw_beta)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    cfg = RefineConfig(cam_dir=cam_dir, root=root, out_dir=out_dir, dataset=dataset, split=split, params=params,
                       limit=limit, allow_pickle=allow_pickle, evaluate=evaluate, workers=workers, seed=seed,
                       shard=shard, random_walk=random_walk, rw_beta=rw_beta, rw_steps=rw_steps, device=device,
                       overwrite=overwrite)
    metrics = run(cfg)
    threshold = metrics["threshold"]
    click.echo(f"{metrics['refined']} refined, {metrics['skipped']} skipped -> {out_dir}")
    if threshold.get("count"):
        click.echo(f"threshold median {threshold['median']:.3f} "
                   f"(p25 {threshold['p25']:.3f}, p75 {threshold['p75']:.3f}); "
                   f"fallbacks {metrics['fallbacks']['total']}/{threshold['fits']}; "
                   f"ignore {metrics['ignore_ratio']['pixels']:.3f}")
    if metrics.get("eval"):
        report = metrics["eval"]
        click.echo(f"{split} pseudo-label mIoU {report['miou']:.4f} (255 as background); labelled pixels: "
                   f"mIoU {report['miou_labelled']:.4f}, precision {report['precision_labelled']:.4f}, "
                   f"255 share {report['ignore_share']:.4f}")
