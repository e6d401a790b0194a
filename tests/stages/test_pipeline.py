"""`wsss pipeline`: recipes load and check themselves, and every shipped recipe runs end to end on tiny data.

The VOC, VOC-CoSA, COCO and folder recipes run on small generated datasets of their own kind through
``--set`` overrides (tiny crops, one epoch, a few DeepLab iterations), so their real code paths --
the affinity walk, RAW weighting, COCO split names, a folder without masks -- run in CI, not only the
demo's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import assert_one_line_error
from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset, SplitSpec, write_prepared
from wsss.stages.cli import cli
from wsss.stages.pipeline import STAGES, WIRED, Recipe, parse_overrides, placeholder_wiring, shipped_recipes

RECIPES = ("coco", "demo", "folder", "voc", "voc-cosa")

# one epoch, 32 px crops, a few iterations: each recipe's own choices stay, only the sizes shrink
TINY = {
    "pipeline": {"weights": "none", "device": "cpu", "threads": "1"},
    "demo-data": {"num_train": "6", "num_val": "3", "size": "40"},
    "pretrain": {"epochs": "1", "batch_size": "6", "crop_size": "32", "workers": "0"},
    "train-cls": {"backbone": "resnet18", "crop_size": "32", "batch_size": "3", "epochs": "1", "workers": "0",
                  "val_cam_images": "3"},
    "make-cam": {"scales": "1.0", "workers": "0"},
    "train-aff": {"crop_size": "32", "batch_size": "3", "epochs": "1", "embed_dim": "8", "workers": "0"},
    "refine": {"rw_steps": "2", "workers": "1"},
    "train-seg": {"model": "deeplabv3_resnet18", "crop_size": "32", "batch_size": "3", "iterations": "2",
                  "eval_every": "2", "workers": "0"},
    "predict": {"scales": "1.0", "crf": "false", "workers": "0"},
}


def tiny_overrides(recipe: str) -> list[str]:
    args = []
    for stage, values in TINY.items():
        if stage == "pretrain" and recipe != "demo":
            continue
        for key, value in values.items():
            args += ["--set", f"{stage}.{key}={value}"]
    return args


def run_recipe(recipe: str, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["pipeline", recipe, "--out", str(out), *tiny_overrides(recipe), *extra])


# --------------------------------------------------------------------------- tiny datasets of every kind


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A tiny VOC-layout dataset from the demo generator (prepared as VOC)."""
    parent = tmp_path_factory.mktemp("voc")
    result = CliRunner().invoke(cli, ["demo-data", str(parent), "--num-train", "6", "--num-val", "3", "--size", "40"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["prepare", "voc", "--root", str(parent / "VOC2012")])
    assert result.exit_code == 0, result.output
    return parent / "VOC2012"


def _relabelled(source: Path, target: Path, kind: str, splits: dict[str, str], masks: bool) -> Path:
    """The demo images prepared again as another dataset kind, under other split names."""
    voc = PreparedDataset.load(source)
    spec = SplitSpec(image_dir=str(source / "JPEGImages"), image_ext=".jpg",
                     mask_dir=str(source / "SegmentationClass") if masks else None)
    ids = {new: voc.ids(old) for old, new in splits.items()}
    labels = {image_id: list(voc.image_labels(image_id)) for split in ids.values() for image_id in split}
    write_prepared(target, kind, list(voc.classes), {name: (spec, split) for name, split in ids.items()}, labels)
    return target


def test_every_shipped_recipe_is_listed():
    assert set(shipped_recipes()) == set(RECIPES)
    result = CliRunner().invoke(cli, ["pipeline", "--list"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == sorted(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_builds_every_stage_config(name):
    recipe = Recipe.load(shipped_recipes()[name])  # builds every stage's config: raises on a bad key or value
    for stage in STAGES:
        cfg = recipe.config(stage, placeholder_wiring(stage))
        for key, value in recipe.stages[stage].items():  # what the recipe says is what the stage gets
            pairs = ([(f"{key}.{sub}", getattr(getattr(cfg, key), sub), item) for sub, item in value.items()]
                     if isinstance(value, dict) else [(key, getattr(cfg, key), value)])
            for name, got, wanted in pairs:
                assert got == (tuple(wanted) if isinstance(wanted, list) else wanted), (stage, name)


def test_demo_recipe_stops_after_a_stage_with_the_recipe_overrides_and_wiring_in_place(tmp_path):
    # (the whole demo recipe runs in test_end_to_end.py, through run_pipeline.sh)
    result = run_recipe("demo", tmp_path / "demo", "--stop-after", "make-cam", "--set", "train-cls.lr=0.05")
    assert result.exit_code == 0, result.output[-3000:]
    run = tmp_path / "demo" / "run"
    assert (run / "cams").is_dir() and not (run / "pseudo").exists()
    assert "stopped after make-cam" in result.output and "CAM mIoU" in result.output
    config = json.loads(artifacts.config_path(run / "cls").read_text())["config"]
    # the recipe's own values, the overrides and the wiring all reached the classifier
    assert config["output_stride"] == 8 and config["sgd"] == {**config["sgd"], "lr": 0.05, "head_lr_mult": 1.0}
    assert config["epochs"] == 1 and config["weights"].endswith("backbone.pth") and config["jitter"] is False
    assert config["root"].endswith("VOC2012") and config["out_dir"] == str(run / "cls")


@pytest.mark.parametrize("recipe", ["voc", "voc-cosa"])
def test_voc_recipes_run_end_to_end(images, tmp_path, recipe):
    result = run_recipe(recipe, tmp_path / recipe, "--root", str(images))
    assert result.exit_code == 0, result.output[-3000:]
    run = tmp_path / recipe / "run"
    refine = json.loads(artifacts.config_path(run / "pseudo").read_text())["config"]
    seg = json.loads(artifacts.config_path(run / "seg").read_text())["config"]
    if recipe == "voc":  # IRN-style: the walk on the learned affinities, fixed background threshold
        assert (run / "aff" / "last.pth").is_file() and refine["random_walk"].endswith("aff")
        assert refine["threshold"] == "fixed" and refine["bg_thresh"] == 0.25
    else:  # CoSA-style: pooled GMM + CRF, DeepLab weighted by the reliability maps
        assert not (run / "aff").exists() and refine["threshold"] == "gmm" and refine["crf"] is True
        assert seg["raw"] is True
    assert 0.0 <= artifacts.read_json(artifacts.eval_metrics_path(run / "pseudo", "train"))["miou"] <= 1.0
    assert 0.0 <= artifacts.read_json(artifacts.eval_metrics_path(run / "pred", "val"))["miou"] <= 1.0
    assert len(list((run / "pred").glob("*.png"))) == 3


def test_coco_recipe_runs_on_coco_split_names(images, tmp_path):
    root = _relabelled(images, tmp_path / "coco", "coco", {"train": "train2014", "val": "val2014"}, masks=True)
    result = run_recipe("coco", tmp_path / "run", "--root", str(root))
    assert result.exit_code == 0, result.output[-3000:]
    assert json.loads(artifacts.config_path(tmp_path / "run" / "run" / "cls").read_text())["config"]["split"] == \
        "train2014"
    assert len(list((tmp_path / "run" / "run" / "pred").glob("*.png"))) == 3


def test_folder_recipe_runs_without_masks(images, tmp_path):
    root = _relabelled(images, tmp_path / "folder", "folder", {"train": "train", "val": "val"}, masks=False)
    result = run_recipe("folder", tmp_path / "run", "--root", str(root))
    assert result.exit_code == 0, result.output[-3000:]
    run = tmp_path / "run" / "run"
    assert len(list((run / "pseudo").glob("*.png"))) == 6 and len(list((run / "pred").glob("*.png"))) == 3
    assert "mIoU" not in result.output  # nothing was scored: no masks
    assert not artifacts.eval_metrics_path(run / "pseudo", "train").exists()
    assert json.loads(artifacts.config_path(run / "seg").read_text())["config"]["val_split"] is None


# --------------------------------------------------------------------------- bad recipes


@pytest.mark.parametrize("text, needle", [
    ("[trian-cls]\nepochs = 1\n", "unknown table [trian-cls]"),
    ("[train-cls]\nepoch = 1\n", "[train-cls]: unknown setting 'epoch'"),
    ("[train-cls]\nepochs = \"many\"\n", "[train-cls]: epochs: expected a whole number"),
    ("[train-cls]\nlr = nan\n", "lr = nan: must be a finite number"),
    ("[train-cls]\nepochs = 0\n", "[train-cls] --epochs 0: must be >= 1"),
    ("[train-cls]\nout_dir = \"x\"\n", "[train-cls] out_dir is set by the pipeline"),
    ("[pipeline]\ndataset = \"imagenet\"\n", "--dataset 'imagenet': choose from demo, voc, coco, folder"),
    ("[pipeline]\nrecipe = 1\n", "[pipeline]: unknown setting 'recipe'"),
    ("train-cls = 3\n", "train-cls must be a table"),
    ("[train-cls\n", "not valid TOML"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, needle):
    recipe = tmp_path / "mine.toml"
    recipe.write_text(text)
    result = CliRunner().invoke(cli, ["pipeline", str(recipe), "--out", str(tmp_path / "out"),
                                      "--stop-after", "train-cls"])
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_bad_overrides_and_unknown_recipes(tmp_path):
    assert_one_line_error(CliRunner().invoke(cli, ["pipeline", "demo", "--set", "epochs=3"]), "expected STAGE.KEY=VALUE")
    assert_one_line_error(CliRunner().invoke(cli, ["pipeline", "demo", "--set", "train-cls.epochs=abc",
                                                   "--out", str(tmp_path / "o")]), "epochs: expected a whole number")
    assert_one_line_error(CliRunner().invoke(cli, ["pipeline", "nosuch"]), "no shipped recipe of that name")
    assert parse_overrides(("refine.crf_params.iterations=5",)) == {"refine": {"crf_params": {"iterations": "5"}}}


def test_a_dataset_recipe_without_root_says_so(tmp_path):
    result = CliRunner().invoke(cli, ["pipeline", "voc", "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "root is needed for dataset voc")


def test_wired_keys_are_config_fields():
    from wsss.stages.pipeline import _stage_command

    for stage, keys in WIRED.items():
        fields = set(_stage_command(stage).config_class.__dataclass_fields__)
        assert set(keys) - {"seed", "device", "evaluate"} <= fields, stage


def test_gpus_runs_the_training_stages_under_torchrun_from_their_settings_file(tmp_path):
    # two Gloo processes on the CPU stand in for two GPUs: the classifier trains under torchrun, reading the
    # settings the pipeline resolved from the file it wrote
    result = run_recipe("demo", tmp_path / "demo", "--gpus", "2", "--stop-after", "train-cls",
                        "--set", "pipeline.pretrain=false", "--set", "train-cls.batch_size=2")
    assert result.exit_code == 0, result.output[-3000:]
    run = tmp_path / "demo" / "run"
    settings = json.loads((run / ".pipeline" / "train-cls.json").read_text())
    config = json.loads(artifacts.config_path(run / "cls").read_text())
    assert config["world_size"] == 2 and settings["epochs"] == 1 and config["config"]["epochs"] == 1
    assert artifacts.checkpoint_path(run / "cls", "last").is_file()


def test_a_recipe_starts_from_its_base(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('base = "demo"\n[pipeline]\nout = "work/mine"\n[train-cls]\nepochs = 20\n[refine]\n'
                    'gmm_per_class = true\n')
    recipe = Recipe.load(mine)
    demo = Recipe.load(shipped_recipes()["demo"])
    assert recipe.pipeline.out == Path("work/mine") and recipe.pipeline.pretrain is True  # the rest is demo's
    assert recipe.stages["train-cls"] == {**demo.stages["train-cls"], "epochs": 20}
    assert recipe.stages["refine"] == {**demo.stages["refine"], "gmm_per_class": True}
    child = tmp_path / "child.toml"
    child.write_text('base = "mine.toml"\n[train-cls]\nepochs = 3\n')  # a file, beside the recipe
    assert Recipe.load(child).stages["train-cls"]["epochs"] == 3 and Recipe.load(child).pipeline.out == Path("work/mine")
    loop = tmp_path / "loop.toml"
    loop.write_text('base = "loop.toml"\n')
    assert_one_line_error(CliRunner().invoke(cli, ["pipeline", str(loop)]), "leads back to itself")
    missing = tmp_path / "orphan.toml"
    missing.write_text('base = "nosuch"\n')
    assert_one_line_error(CliRunner().invoke(cli, ["pipeline", str(missing)]), "no shipped recipe of that name")


def test_a_setting_that_cannot_work_on_the_dataset_stops_the_run_before_any_stage(images, tmp_path):
    root = _relabelled(images, tmp_path / "folder", "folder", {"train": "train", "val": "val"}, masks=False)
    result = run_recipe("folder", tmp_path / "run", "--root", str(root), "--set", "pipeline.upper_bound=true")
    assert_one_line_error(result, "upper_bound", "has no masks to train on")
    assert not (tmp_path / "run" / "run").exists()  # nothing was trained first


def test_none_in_set_is_none_and_each_stage_gets_the_runs_threads(tmp_path):
    recipe = Recipe.load(shipped_recipes()["demo"], parse_overrides(("pipeline.upper_bound_dir=none",
                                                                     "train-seg.reliability_dir=none")))
    assert recipe.pipeline.upper_bound_dir is None
    assert recipe.config("train-seg", placeholder_wiring("train-seg")).reliability_dir is None
    # a stage's own threads do not stay set for the stages after it
    result = run_recipe("demo", tmp_path / "demo", "--stop-after", "make-cam", "--set", "pipeline.pretrain=false",
                        "--set", "train-cls.threads=2")
    assert result.exit_code == 0, result.output[-3000:]
    run = tmp_path / "demo" / "run"
    assert json.loads(artifacts.config_path(run / "cls").read_text())["config"]["threads"] == 2
    assert json.loads(artifacts.config_path(run / "cams").read_text())["config"]["threads"] == 1


def test_a_base_recipe_and_overrides_merge_the_sgd_keys_key_by_key(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('base = "voc"\n[train-seg.sgd]\nlr = 0.001\n')  # voc.toml writes lr flat
    recipe = Recipe.load(mine, parse_overrides(("train-seg.momentum=0.5",)))
    sgd = recipe.config("train-seg", placeholder_wiring("train-seg")).sgd
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (0.001, 0.5, 0.0005)
