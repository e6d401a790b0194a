"""pretrain's --temperature and --key-momentum reach the pretext network (what they change there is tested in
tests/wsss/test_selfsup.py)."""

from click.testing import CliRunner

import wsss.selfsup
from wsss.stages.cli import cli


def test_temperature_and_key_momentum_reach_the_pretext_network(tiny_demo, tmp_path, monkeypatch):
    made = []

    class RecordingPretext(wsss.selfsup.Pretext):
        def __init__(self, *args, **options):
            super().__init__(*args, **options)
            made.append(self)

    monkeypatch.setattr(wsss.selfsup, "Pretext", RecordingPretext)
    result = CliRunner().invoke(cli, [
        "-q", "pretrain", "--root", str(tiny_demo), "--out", str(tmp_path / "pre"), "--backbone", "resnet18",
        "--method", "contrastive", "--queue", "8", "--key-splits", "2", "--temperature", "0.3", "--key-momentum",
        "0.5", "--crop-size", "32", "--batch-size", "4", "--epochs", "1", "--probe-split", "none", "--device", "cpu",
        "--workers", "0", "--threads", "1"])
    assert result.exit_code == 0, result.output
    (model,) = made
    assert model.name == "contrastive-moco" and model.temperature == 0.3 and model.key_momentum == 0.5
