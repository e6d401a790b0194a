"""``wsss pipeline RECIPE``: every stage end to end, from a recipe file.

A recipe is a TOML file: a ``[pipeline]`` table (:class:`PipelineSettings`: the dataset, its splits,
which optional stages run) and one table per stage (``[train-cls]``, ``[refine]``, ...) whose keys
are that stage's options, by their config field names (``wsss <stage> --help`` lists them;
``crop_size`` for ``--crop-size``).  The shipped recipes live in :mod:`wsss.recipes` (``wsss
pipeline --list``); a user's recipe is any file of the same shape.  ``--set stage.key=value``
overrides one value, as text, like the command line.

The pipeline sets what wires the stages together -- dataset root and kind, splits, output folders
(:data:`wsss.artifacts.RUN_LAYOUT` under ``<out>/run``), checkpoints, CAM and label folders, seed,
device -- so a recipe that sets one of those in a stage table is refused.  Every stage resumes, so
running the same command again continues where it stopped.  Evaluations (``wsss eval`` of the
pseudo-labels and predictions, which the report reads) run only where the split has ground-truth
masks.  ``base = "NAME"`` at the top of a recipe starts from another recipe.  With ``gpus > 1`` the
training stages run under ``torchrun`` (one process per GPU), each reading its resolved settings
from a JSON file under ``<out>/run/.pipeline``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from wsss import artifacts
from wsss import settings as S
from wsss.artifacts import RUN_LAYOUT
from wsss.errors import WsssError
from wsss.settings import Settings, setting
from wsss.stages.options import device_setting, seed_setting, set_log_level, verbosity_options

log = logging.getLogger(__name__)

DATASETS = ("demo", "voc", "coco", "folder")
#: The stages in the order they run; a recipe has one optional table per stage.
STAGES = ("demo-data", "pretrain", "train-cls", "make-cam", "train-aff", "refine", "train-seg", "predict", "eval",
          "report")
#: Where ``--stop-after`` may stop.
STOP_POINTS = ("pretrain", "train-cls", "make-cam", "train-aff", "refine", "train-seg", "predict")
#: Stages trained under torchrun when ``gpus > 1``.
TRAINING_STAGES = ("pretrain", "train-cls", "train-aff", "train-seg")
#: Config fields the pipeline sets for each stage (a recipe may not): the wiring between stages.
WIRED = {
    "demo-data": ("out_dir",),
    "pretrain": ("root", "dataset", "split", "probe_split", "out_dir", "backbone", "seed", "device"),
    "train-cls": ("root", "dataset", "split", "val_split", "out_dir", "weights", "seed", "device"),
    "make-cam": ("root", "dataset", "split", "checkpoint", "out_dir", "evaluate", "device"),
    "train-aff": ("root", "dataset", "split", "cam_dir", "out_dir", "backbone", "weights", "seed", "device"),
    "refine": ("root", "dataset", "split", "cam_dir", "out_dir", "random_walk", "evaluate", "seed", "device"),
    "train-seg": ("root", "dataset", "split", "val_split", "labels", "out_dir", "weights_backbone", "upper_bound",
                  "seed", "device"),
    "predict": ("root", "dataset", "split", "checkpoint", "out_dir", "evaluate", "device"),
    "eval": ("root", "dataset", "split", "pred_dir", "out_file"),
    "report": ("run_dir",),
}

#: Stand-ins for the wiring, to check a recipe's tables before anything runs.
PLACEHOLDER_WIRING = {"root": Path("."), "out_dir": Path("."), "checkpoint": Path("."), "cam_dir": Path("."),
                      "labels": "pseudo", "pred_dir": Path("."), "run_dir": Path(".")}


def placeholder_wiring(stage: str) -> dict[str, Any]:
    """Stand-ins for what the pipeline sets in ``stage``'s config."""
    return {key: value for key, value in PLACEHOLDER_WIRING.items() if key in WIRED[stage]}


@dataclass(frozen=True)
class PipelineSettings(Settings):
    """The ``[pipeline]`` table of a recipe: the data and which optional stages run."""

    dataset: str = setting("demo", "demo (generated under <out>/data), or a dataset prepared with `wsss prepare`.",
                           choices=DATASETS)
    root: Path | None = setting(None, "Prepared dataset root (voc: VOCdevkit/VOC2012, coco: its root, folder: its "
                                      "root); demo: the folder the demo data is written to (default <out>/data; "
                                      "the dataset is its VOC2012/).")
    out: Path = setting(Path("work/demo"), "Output folder; the stage folders are under <out>/run.")
    train_split: str | None = setting(None, "Split for the classifier, CAMs, pseudo-labels and DeepLab (default: "
                                            "train, train2014 for coco; set train_aug for VOC with SBD prepared).")
    val_split: str | None = setting(None, "Split for validation and the final mIoU (default: val, val2014 for "
                                          "coco); skipped where the dataset has no such split.")
    pretrain: bool = setting(False, "Self-supervised pretraining first ([pretrain] method); its backbone then "
                                    "initialises the classifier (and DeepLab with seg_init = weights).")
    pretrained: Path | None = setting(None, "A backbone file to start from instead of pretraining (e.g. shared by "
                                            "several runs).")
    weights: str = setting("imagenet", "Initialisation of both networks without pretraining: imagenet, none or a "
                                       "state_dict PATH.")
    affinity: bool = setting(False, "Train an affinity network and refine with a random walk on it.")
    upper_bound: bool = setting(False, "Also train DeepLab on the ground truth with the same recipe; the report "
                                       "shows weak/full.")
    upper_bound_dir: Path | None = setting(None, "Where that ground-truth run lives (default <out>/run/seg_gt; "
                                                 "runs with the same seed, trunk and weights can share one).")
    seg_init: str = setting("cls", "DeepLab's trunk starts from the CAM classifier's (cls, when both are the same "
                                   "ResNet) or from the weights above.", choices=("cls", "weights"))
    predict_train: bool = setting(False, "Also predict the training split (the report's gallery shows "
                                         "image | CAM | pseudo-label | prediction | truth).")
    threads: int | None = setting(None, "Intra-op threads of every stage (OMP_NUM_THREADS); tiny images gain little "
                                        "from more, and on a busy machine spinning threads slow training.",
                                  at_least=1)
    gpus: int = setting(1, "GPUs on this machine; more than 1 runs the training stages under torchrun.", at_least=1)
    device: str = device_setting()
    seed: int = seed_setting()

    def splits(self) -> tuple[str, str]:
        """The (train, val) split names, with the dataset's defaults."""
        coco = self.dataset == "coco"
        return (self.train_split or ("train2014" if coco else "train"),
                self.val_split or ("val2014" if coco else "val"))


# --------------------------------------------------------------------------- recipes


def shipped_recipes() -> dict[str, Path]:
    """The recipes shipped in :mod:`wsss.recipes`, by name."""
    folder = importlib.resources.files("wsss.recipes")
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".toml")}


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe (what it is for)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def find_recipe(name: str, beside: Path | None = None) -> Path:
    """A shipped recipe by name, or a recipe file by path (relative to the folder ``beside``, if given)."""
    recipes = shipped_recipes()
    if name in recipes:
        return recipes[name]
    path = Path(beside or ".") / name
    if path.is_file():
        return path
    raise WsssError(f"{name}: no such recipe file, and no shipped recipe of that name "
                    f"(shipped: {', '.join(sorted(recipes))})")


def _stage_command(stage: str) -> click.Command:
    """The click command of a stage (its ``config_class`` and ``run_config``)."""
    from wsss.stages.cli import COMMANDS

    return importlib.import_module(COMMANDS[stage][0]).command


def _prepare_command(kind: str) -> click.Command:
    """``wsss prepare KIND``'s command."""
    return _stage_command("prepare").commands[kind]


def read_recipe_tables(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file's tables; ``base = "NAME or FILE"`` at its top starts from that recipe's tables.

    Raises:
        WsssError: a base that cannot be found, or recipes that are each other's base.
    """
    tables = _gathered(S.read_settings_file(path))
    base = tables.pop("base", None)
    if base is None:
        return tables
    if not isinstance(base, str):
        raise WsssError(f"{path}: base = {base!r}: expected the name or file of a recipe")
    base_path = find_recipe(base, beside=Path(path).parent)
    if base_path.resolve() in seen or base_path.resolve() == Path(path).resolve():
        raise WsssError(f"{path}: base = {base!r} leads back to itself")
    return S.merge(read_recipe_tables(base_path, (*seen, Path(path).resolve())), tables)


def _gathered(tables: dict) -> dict:
    """Each stage table with the keys of its unprefixed group (SGD's ``lr``) in that group's table, so that
    tables from two sources (a base recipe, ``--set``) merge key by key."""
    gathered = dict(tables)
    for stage, values in tables.items():
        if stage in STAGES and isinstance(values, dict):
            gathered[stage] = S.gather_unprefixed(_stage_command(stage).config_class, values)
    return gathered


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, dict]:
    """``("train-cls.epochs=3", "refine.crf_params.iterations=5")`` -> nested tables of text values."""
    tables: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise WsssError(f"--set {pair!r}: expected STAGE.KEY=VALUE, e.g. train-cls.epochs=3")
        level = tables.setdefault(parts[0], {})
        for part in parts[1:-1]:
            level = level.setdefault(part, {})
        level[parts[-1]] = value
    return tables


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe: the pipeline's settings and each stage's own (unchecked) values."""

    source: str
    pipeline: PipelineSettings
    stages: dict[str, dict]

    @classmethod
    def load(cls, path: Path, overrides: dict[str, dict] | None = None, **pipeline_values: Any) -> "Recipe":
        """Read a recipe file, apply ``--set`` tables and the pipeline's own options (``out``, ``root``).

        Raises:
            WsssError: unknown table or key, a wrong type, NaN, a wired key set by the recipe (one line
                naming the file and the key).
        """
        tables = read_recipe_tables(path)
        unknown = sorted((set(tables) | set(overrides or {})) - {"pipeline", *STAGES})
        if unknown:
            raise WsssError(f"{path}: unknown table [{unknown[0]}] (known: pipeline, {', '.join(STAGES)})")
        for stage, values in tables.items():
            if not isinstance(values, dict):
                raise WsssError(f"{path}: {stage} must be a table ([{stage}])")
        tables = S.merge(tables, _gathered(overrides or {}))  # gathered alike: an override wins in either form
        for stage, values in tables.items():
            wired = sorted(set(values) & set(WIRED.get(stage, ())))
            if wired:
                raise WsssError(f"{path}: [{stage}] {wired[0]} is set by the pipeline (it wires the stages "
                                "together); set it in [pipeline] or leave it out")
        given = {key: value for key, value in pipeline_values.items() if value is not None}
        try:
            pipeline = S.build(PipelineSettings, S.merge(tables.get("pipeline", {}), given),
                               where=f"{path}: [pipeline]")
        except S.SettingError as err:
            raise WsssError(f"{path}: [pipeline] {err}") from None
        recipe = cls(str(path), pipeline, {stage: tables.get(stage, {}) for stage in STAGES})
        for stage in STAGES:  # every table checked before any stage runs
            recipe.config(stage, placeholder_wiring(stage))
        return recipe

    def config(self, stage: str, wiring: dict[str, Any], command: click.Command | None = None):
        """The checked config of ``stage``: the recipe's values over its defaults, then the wiring."""
        command = command or _stage_command(stage)
        fields = {field.name for field in dataclasses.fields(command.config_class)}
        wiring = {key: value for key, value in wiring.items() if key in fields}
        try:
            return S.build(command.config_class, {**self.stages[stage], **wiring},
                           where=f"{self.source}: [{stage}]")
        except S.SettingError as err:
            raise WsssError(f"{self.source}: [{stage}] {err}") from None


# --------------------------------------------------------------------------- running


@dataclass
class PipelineRun:
    """Runs the stages of one recipe in order (see the module docstring)."""

    recipe: Recipe
    stop_after: str | None = None

    def __post_init__(self) -> None:
        self.settings = self.recipe.pipeline
        self.run_dir = Path(self.settings.out) / "run"
        self.train_split, self.val_split = self.settings.splits()

    # ----------------------------------------------------------------- helpers

    def folder(self, stage: str) -> Path:
        return RUN_LAYOUT.folder(self.run_dir, stage)

    def common(self) -> dict[str, Any]:
        return {"seed": self.settings.seed, "device": self.settings.device}

    def configure(self, step: Step):
        """The checked config of a step: the recipe's values, the wiring, the run's seed, device and threads."""
        wiring = {**(self.common() if step.common else {}), **step.wiring}
        if "threads" not in self.recipe.stages.get(step.stage, {}):
            wiring["threads"] = self.threads  # else one stage's threads would stay set for the next
        return self.recipe.config(step.stage, wiring)  # (keys a stage has no field for are left out there)

    def execute(self, step: Step, cfg) -> None:
        """Run one step (in this process, or under torchrun for training with several GPUs)."""
        target = getattr(cfg, "out_dir", None) or getattr(cfg, "pred_dir", None) or getattr(cfg, "run_dir", "")
        click.echo(f"\n== {step.stage} -> {target}")
        if self.settings.gpus > 1 and step.stage in TRAINING_STAGES:
            self.torchrun(step.stage, cfg)
        else:
            _stage_command(step.stage).run_config(cfg)

    def step(self, stage: str, wiring: dict[str, Any], common: bool = True) -> None:
        """Configure and run one stage at once (the demo data, before the plan)."""
        step = Step(stage, wiring, common=common)
        self.execute(step, self.configure(step))

    def torchrun(self, stage: str, cfg: Settings) -> None:
        settings_file = self.run_dir / ".pipeline" / f"{stage}.json"
        artifacts.write_json(settings_file, cfg)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(self.settings.gpus), "-m", "wsss.stages.cli", stage, "--config", str(settings_file)]
        log.info("%s", " ".join(command))
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0:
            raise WsssError(f"{stage} under torchrun failed (exit {completed.returncode}); its log is above")

    # ----------------------------------------------------------------- the stages

    def data(self):
        """The prepared dataset (the demo's generated and prepared first)."""
        from wsss.datasets.prepared import PreparedDataset

        settings = self.settings
        if settings.dataset == "demo":
            parent = Path(settings.root or Path(settings.out) / "data")
            root = parent / "VOC2012"
            if not (root / "ImageSets" / "Segmentation" / f"{self.val_split}.txt").is_file():
                self.step("demo-data", {"out_dir": parent}, common=False)  # [demo-data] seed: the images' own
            prepare = _prepare_command("voc")
            prepare.run_config(S.build(prepare.config_class, {"root": root}))
            return PreparedDataset.load(root, "voc")
        if settings.root is None:
            raise WsssError(f"{self.recipe.source}: [pipeline] root is needed for dataset {settings.dataset} "
                            f"(prepare it first with `wsss prepare {settings.dataset}`; then --root DIR)")
        return PreparedDataset.load(settings.root, settings.dataset)

    def run(self) -> None:
        """Every stage in order, stopping after ``stop_after``.

        Every stage runs with the pipeline's ``threads`` (default: the count this process started with),
        unless its own table sets ``threads``; the count and ``OMP_NUM_THREADS`` are restored afterwards.
        """
        import cv2
        import torch

        before = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads(), cv2.getNumThreads()
        self.threads = self.settings.threads or before[1]
        if self.settings.threads is not None:
            os.environ["OMP_NUM_THREADS"] = str(self.settings.threads)  # also the stages' worker processes
        try:
            self.stages()
        finally:
            if before[0] is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = before[0]
            torch.set_num_threads(before[1])
            cv2.setNumThreads(before[2])

    def plan(self, dataset) -> list[Step]:
        """Every step of the run on ``dataset``, in order, up to ``stop_after``.

        Raises:
            WsssError: a setting that cannot work on this dataset (checked before any step runs).
        """
        kind, root, train, val = dataset.kind, dataset.root, self.train_split, self.val_split
        data = {"root": root, "dataset": kind}
        has_val = val in dataset.splits
        masks = {split: split in dataset.splits and dataset.has_masks(split) for split in (train, val)}
        cls_cfg = self.recipe.config("train-cls", {**data, "split": train, "out_dir": self.folder("cls")})
        steps: list[Step] = []

        weights = self.settings.weights
        if self.settings.pretrained is not None:
            if not Path(self.settings.pretrained).is_file():
                raise WsssError(f"{self.settings.pretrained}: pretrained backbone file not found ([pipeline] "
                                "pretrained)")
            weights = str(self.settings.pretrained)
        elif self.settings.pretrain:
            steps.append(Step("pretrain", {**data, "split": train, "probe_split": val if has_val else None,
                                           "out_dir": self.folder("pretrain"), "backbone": cls_cfg.backbone}))
            weights = str(artifacts.pretrained_backbone_path(self.folder("pretrain")))
        steps.append(Step("train-cls", {**data, "split": train, "val_split": val if has_val else None,
                                        "out_dir": self.folder("cls"), "weights": weights}))
        classifier = artifacts.checkpoint_path(self.folder("cls"), "last")
        steps.append(Step("make-cam", {**data, "split": train, "checkpoint": classifier,
                                       "out_dir": self.folder("cams"), "evaluate": masks[train]}))
        walk = None
        if self.settings.affinity:
            steps.append(Step("train-aff", {**data, "split": train, "cam_dir": self.folder("cams"),
                                            "out_dir": self.folder("aff"), "backbone": cls_cfg.backbone,
                                            "weights": str(classifier)}))
            walk = self.folder("aff")
        steps.append(Step("refine", {**data, "split": train, "cam_dir": self.folder("cams"),
                                     "out_dir": self.folder("pseudo"), "random_walk": walk, "evaluate": False}))
        if masks[train]:  # <pseudo>/metrics_eval_<split>.json, which the report reads
            steps.append(Step("eval", {**data, "split": train, "pred_dir": self.folder("pseudo")}, after="refine"))

        pseudo = str(self.folder("pseudo"))
        seg_cfg = self.recipe.config("train-seg", {**data, "split": train, "labels": pseudo,
                                                   "out_dir": self.folder("seg")})
        seg_weights = weights
        if self.settings.seg_init == "cls" and seg_cfg.model == f"deeplabv3_{cls_cfg.backbone}":
            seg_weights = str(classifier)  # the trunk that learned these images' labels
        seg = {**data, "split": train, "val_split": val if masks[val] else None, "weights_backbone": seg_weights}
        upper = None
        if self.settings.upper_bound:
            if not masks[train]:
                raise WsssError(f"[pipeline] upper_bound: split {train!r} of {root} has no masks to train on")
            upper = Path(self.settings.upper_bound_dir or self.folder("seg_gt"))
            # the same recipe on the ground truth: no reliability weighting, there are no pseudo-labels to weight
            steps.append(Step("train-seg", {**seg, "labels": "gt", "raw": False, "reliability_dir": None,
                                            "out_dir": upper}))
        steps.append(Step("train-seg", {**seg, "labels": pseudo, "out_dir": self.folder("seg"),
                                        "upper_bound": upper}))

        segmenter = artifacts.checkpoint_path(self.folder("seg"), "last")
        if has_val:
            steps.append(Step("predict", {**data, "split": val, "checkpoint": segmenter,
                                          "out_dir": RUN_LAYOUT.pred_folder(self.run_dir), "evaluate": False}))
            if masks[val]:
                steps.append(Step("eval", {**data, "split": val, "pred_dir": RUN_LAYOUT.pred_folder(self.run_dir)},
                                  after="predict"))
        if self.settings.predict_train:
            steps.append(Step("predict", {**data, "split": train, "checkpoint": segmenter,
                                          "out_dir": RUN_LAYOUT.pred_folder(self.run_dir, train), "evaluate": False}))
        if any(masks.values()):
            steps.append(Step("report", {"run_dir": self.run_dir}, common=False))
        if self.stop_after is not None:
            last = max((index for index, step in enumerate(steps) if step.point == self.stop_after), default=-1)
            steps = steps[:last + 1]
        return steps

    def stages(self) -> None:
        dataset = self.data()
        steps = self.plan(dataset)
        configs = [self.configure(step) for step in steps]  # every setting checked before the first step runs
        for step, cfg in zip(steps, configs):
            self.execute(step, cfg)
        if self.stop_after is not None:
            click.echo(f"\n== stopped after {self.stop_after} (--stop-after)")
        elif not any(step.stage == "report" for step in steps):
            click.echo(f"\n== no report: no split of {dataset.root} has masks to score the stages with")


@dataclass(frozen=True)
class Step:
    """One stage of a run: its command's name, the wiring the pipeline gives it, and the ``--stop-after`` point
    it belongs to (an evaluation belongs to the stage it scores)."""

    stage: str
    wiring: dict
    after: str | None = None
    common: bool = True

    @property
    def point(self) -> str:
        return self.after or self.stage


# --------------------------------------------------------------------------- command line


def _pipeline_keys() -> str:
    """The ``[pipeline]`` table's keys, for ``--help``."""
    def toml(value: Any) -> str:
        if value is None:
            return "(unset)"
        if isinstance(value, bool):
            return "true" if value else "false"
        return f'"{value}"' if isinstance(value, (str, Path)) else str(value)

    lines = ["\b", "The [pipeline] table of a recipe (a stage's table takes that command's options by field name):"]
    for field in dataclasses.fields(PipelineSettings):
        lines.append(f"  {field.name} = {toml(field.default)}: {field.metadata['help']}")
    return "\n".join(lines)


@click.command(epilog=_pipeline_keys(),
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("recipe", required=False)
@click.option("--list", "list_recipes", is_flag=True, help="List the shipped recipes and exit.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (the recipe's [pipeline] out).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Prepared dataset root (the recipe's [pipeline] root).")
@click.option("--stop-after", type=click.Choice(STOP_POINTS), default=None, help="Stop after this stage.")
@click.option("--gpus", type=click.IntRange(min=1), default=None, help="GPUs on this machine (torchrun for training).")
@click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE",
              help="Override one recipe value, e.g. --set train-cls.epochs=3 --set pipeline.seed=1 (repeatable).")
def command(recipe, list_recipes, out, root, stop_after, gpus, overrides, verbose, quiet):
    """Run the whole pipeline from RECIPE: a shipped recipe's name (see --list) or a TOML file.

    \b
    Stages: [demo-data] -> [pretrain] -> train-cls -> make-cam -> [train-aff] -> refine -> eval
            -> [train-seg on ground truth] -> train-seg -> predict -> eval -> report
    Run it again and it resumes: every stage skips finished work.
    """
    set_log_level(verbose, quiet)
    if list_recipes:
        for name, path in sorted(shipped_recipes().items()):
            click.echo(f"{name:<10} {recipe_summary(path)}")
        return
    if recipe is None:
        raise click.UsageError("give a RECIPE (a shipped name, see --list, or a TOML file)")
    loaded = Recipe.load(find_recipe(recipe), parse_overrides(overrides), out=out, root=root, gpus=gpus)
    PipelineRun(loaded, stop_after).run()


command.params.extend(verbosity_options())  # -v/-q after the command, as on every stage
