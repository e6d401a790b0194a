"""`wsss export`: the exported model gives the checkpoint's logits on a real image, in every format."""

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import assert_one_line_error
from wsss import artifacts
from wsss.models.deeplab import build_seg_model
from wsss.segmentation import predict_label
from wsss.stages.cli import cli
from wsss.models import EXPORT_FORMATS
from wsss.transforms import normalize_image

torch.set_num_threads(1)

CLASSES = ["background", "square", "disc"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A train-seg checkpoint with its eager network and an image (odd size, not a check size)."""
    base = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_seg_model("deeplabv3_resnet18", len(CLASSES))
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding them is tested
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    checkpoint = base / "seg" / "last.pth"
    artifacts.save_checkpoint(checkpoint, {"model": model.state_dict(), "config": {}, "classes": CLASSES, "step": 7,
                                           "arch": {"model": "deeplabv3_resnet18", "num_classes": len(CLASSES)}})
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    return base, checkpoint, model.eval(), image


def export(checkpoint, out, *extra):
    return CliRunner().invoke(cli, ["export", "--checkpoint", str(checkpoint), "--out", str(out), *extra])


def _eager_logits(model, image):
    with torch.no_grad():
        return model(normalize_image(image)[None]).numpy()


def _pixels(image):
    return torch.from_numpy(image).permute(2, 0, 1)[None].float()


def _run_exported(export_format, path, image):
    if export_format == "torchscript":
        return torch.jit.load(str(path))(_pixels(image)).detach().numpy()
    if export_format == "pt2":
        return torch.export.load(str(path)).module()(_pixels(image)).detach().numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": _pixels(image).numpy()})[0]


@pytest.mark.parametrize("export_format", EXPORT_FORMATS)
def test_exported_model_gives_the_checkpoints_logits(trained, export_format):
    base, checkpoint, model, image = trained
    if export_format == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = base / export_format
    result = export(checkpoint.parent, out, "--format", export_format)  # the train-seg folder: its last.pth
    assert result.exit_code == 0, result.output
    file = out / {"torchscript": "model.pt", "onnx": "model.onnx", "pt2": "model.pt2"}[export_format]
    assert f"exported -> {file}" in result.output
    logits = _run_exported(export_format, file, image)
    expected = _eager_logits(model, image)
    assert logits.shape == (1, len(CLASSES), 45, 61)
    np.testing.assert_allclose(logits, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))
    np.testing.assert_array_equal(logits[0].argmax(0), predict_label(model, image, scales=(1.0,), flip=False))
    assert (out / "classes.txt").read_text().splitlines() == CLASSES
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["format"] == export_format and metrics["bytes"] == file.stat().st_size
    assert set(metrics["max_abs_diff"]) == {"161x243", "224x97"}
    assert max(metrics["max_abs_diff"].values()) < 1e-3
    config = json.loads(artifacts.config_path(out).read_text())
    assert config["checkpoint_step"] == 7 and config["classes"] == CLASSES


def test_an_export_is_kept_unless_overwrite_or_other_settings(trained):
    base, checkpoint, _, _ = trained
    out = base / "again"
    assert export(checkpoint, out, "--format", "pt2").exit_code == 0
    file = out / "model.pt2"
    first = file.stat().st_mtime_ns
    result = export(checkpoint, out, "--format", "pt2")
    assert result.exit_code == 0 and "already exported" in result.output
    assert file.stat().st_mtime_ns == first
    result = export(checkpoint, out, "--format", "pt2", "--overwrite")
    assert result.exit_code == 0 and "already exported" not in result.output
    assert file.stat().st_mtime_ns != first
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[:1000])  # a truncated model file is exported again, not trusted
    assert "already exported" not in export(checkpoint, out, "--format", "pt2").output
    assert file.stat().st_size == size
    result = export(checkpoint, out, "--format", "torchscript")  # another format beside it
    assert result.exit_code == 0 and "already exported" not in result.output and (out / "model.pt").is_file()


def test_onnx_without_its_packages_is_one_line_naming_the_extra(trained, monkeypatch):
    base, checkpoint, _, _ = trained
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now fails as if not installed
    result = export(checkpoint, base / "no_onnx", "--format", "onnx")
    assert_one_line_error(result, "--format onnx", "onnxscript", 'pip install -e ".[onnx]"')
    assert not (base / "no_onnx" / "model.onnx").exists()


def test_an_export_that_changes_the_logits_is_refused(trained, monkeypatch, tmp_path):
    base, checkpoint, _, _ = trained
    import wsss.export

    original = wsss.export._pt2

    def broken(model, example, classes):
        data, run = original(model, example, classes)
        return data, lambda images: run(images) + 0.1
    monkeypatch.setattr(wsss.export, "_pt2", broken)
    result = export(checkpoint, tmp_path / "bad", "--format", "pt2")
    assert_one_line_error(result, "model.pt2: the exported model's logits differ", "nothing written")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_a_failed_export_leaves_the_folder_as_no_whole_export_and_another_checkpoint_is_refused(trained, monkeypatch,
                                                                                                  tmp_path):
    base, checkpoint, model, _ = trained
    out = tmp_path / "out"
    assert export(checkpoint, out, "--format", "pt2").exit_code == 0
    other = tmp_path / "other.pth"  # the same network trained further: a file of the same size
    artifacts.save_checkpoint(other, {"model": model.state_dict(), "config": {}, "classes": CLASSES, "step": 8,
                                      "arch": {"model": "deeplabv3_resnet18", "num_classes": len(CLASSES)}})
    result = export(other, out, "--format", "pt2")
    assert_one_line_error(result, "holds an export of", "last.pth", "--overwrite")
    import wsss.export

    def fail(*args, **kwargs):
        raise wsss.export.WsssError("the exporter failed")
    monkeypatch.setattr(wsss.export, "export_model", fail)
    assert_one_line_error(export(other, out, "--format", "pt2", "--overwrite"), "the exporter failed")
    monkeypatch.undo()
    # the old model file is still there, but no metrics.json vouches for it any more: it is exported again
    assert not artifacts.metrics_path(out).exists()
    result = export(checkpoint, out, "--format", "pt2")
    assert result.exit_code == 0 and "already exported" not in result.output, result.output
    assert json.loads(artifacts.metrics_path(out).read_text())["checkpoint"] == str(checkpoint)
