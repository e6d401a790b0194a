"""What the quality benchmarks share: running the pipeline and wsss commands, reading results, seed statistics.

Every benchmark measures the pipeline as users run it: ``wsss pipeline demo`` (the recipe file
``wsss/recipes/demo.toml``, never a copy of it) with the row's changes as ``--set`` overrides, each
run in its own folder, resumable (run a benchmark again and finished runs are read, not redone).
Runs go ``--jobs`` at a time, each on one CPU thread.  ``WSSS_NUM_TRAIN`` / ``WSSS_NUM_VAL`` in the
environment change the demo's size for every run (``demo-data.num_train`` / ``num_val``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]


def wsss_command() -> str:
    """The ``wsss`` script of this interpreter's environment (falls back to the one on PATH)."""
    candidate = Path(sys.executable).parent / "wsss"
    return str(candidate) if candidate.is_file() else "wsss"


def run(command: Sequence[str], log_file: Path) -> float:
    """Run a command with one CPU thread, its output in ``log_file``; return its wall time in seconds.

    Raises:
        SystemExit: the command failed (the end of its log is printed).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_file, "w") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        code = subprocess.run(list(command), cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"failed ({code}): {shlex.join(command)}\n{tail}")
    print(f"[{seconds:7.1f} s] {shlex.join(command)}", flush=True)
    return seconds


def pipeline(out: Path, *options: str, recipe: str = "demo") -> float:
    """``wsss pipeline RECIPE --out OUT OPTIONS...`` (resumes a finished run at once)."""
    sizes = {"WSSS_NUM_TRAIN": "demo-data.num_train", "WSSS_NUM_VAL": "demo-data.num_val"}
    for variable, key in sizes.items():
        if os.environ.get(variable):
            options = (*options, "--set", f"{key}={os.environ[variable]}")
    return run([wsss_command(), "pipeline", recipe, "--out", str(out), *options], out / "pipeline.log")


def recipe_set(**values: object) -> list[str]:
    """``--set pipeline.KEY=VALUE`` for each keyword (booleans as true/false)."""
    return [item for key, value in values.items()
            for item in ("--set", f"pipeline.{key}={str(value).lower() if isinstance(value, bool) else value}")]


def stage_set(stage: str, options: str) -> list[str]:
    """A stage's command-line options as ``--set`` overrides of the recipe, read through the command itself:
    ``stage_set("train-cls", "--er-weight 0.3 --no-jitter")`` -> ``--set train-cls.er_weight=0.3 --set
    train-cls.jitter=false``."""
    import importlib

    from wsss.stages.cli import COMMANDS

    command = importlib.import_module(COMMANDS[stage][0]).command
    words, result = shlex.split(options), []
    while words:
        word = words.pop(0)
        for param in command.params:
            if word in param.opts or word in getattr(param, "secondary_opts", ()):
                key = param.name.replace("__", ".")
                if getattr(param, "is_flag", False) or param.secondary_opts:
                    value = "false" if word in param.secondary_opts else "true"
                else:
                    value = words.pop(0)
                result += ["--set", f"{stage}.{key}={value}"]
                break
        else:
            raise SystemExit(f"{stage} has no option {word!r}")
    return result


def in_parallel(tasks: Iterable[Callable[[], object]], jobs: int) -> list:
    """Run the tasks (functions without arguments) ``jobs`` at a time; results in task order."""
    tasks = list(tasks)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return [future.result() for future in [pool.submit(task) for task in tasks]]


def write_tables(md: Path, tables: str) -> None:
    """Put ``tables`` between the ``<!-- tables -->`` and ``<!-- end tables -->`` markers of ``md`` (the text
    around them is kept; a missing file gets only the markers and the tables)."""
    text = md.read_text() if md.is_file() else "<!-- tables -->\n<!-- end tables -->\n"
    head, rest = text.split("<!-- tables -->", 1)
    tail = rest.split("<!-- end tables -->", 1)[1]
    md.write_text(f"{head}<!-- tables -->\n{tables}\n<!-- end tables -->{tail}")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def finished(metrics: Path) -> bool:
    """Whether a stage's ``metrics.json`` says it finished (train-cls and train-seg write one at every checkpoint,
    with ``"finished": false`` until the last)."""
    return metrics.is_file() and json.loads(metrics.read_text()).get("finished", True)


def cam_miou(run_dir: Path, split: str = "train") -> float:
    """CAM mIoU at the best background threshold (make-cam --eval)."""
    return read_json(Path(run_dir) / "cams" / f"metrics_eval_{split}.json")["miou"]


def label_miou(folder: Path, split: str) -> float:
    """mIoU of a folder of label maps (``wsss eval --pred``)."""
    return read_json(Path(folder) / f"metrics_eval_{split}.json")["miou"]


def score_folder(folder: Path, root: Path, split: str) -> float:
    """mIoU of a folder of label maps that a pipeline run wrote (``wsss eval`` once, then read)."""
    folder = Path(folder)
    if not (folder / f"metrics_eval_{split}.json").is_file():
        run([wsss_command(), "-q", "eval", "--root", str(root), "--split", split, "--pred", str(folder),
             "--workers", "1"], folder / "eval.log")
    return label_miou(folder, split)


def _scored(out: Path, root: Path, split: str, command: list[str], log_name: str) -> float:
    """mIoU of the label maps that ``command`` writes into ``out`` (``wsss eval`` on ``split``); a folder
    already scored is read, not redone."""
    if not (out / f"metrics_eval_{split}.json").is_file():
        run(command, out / log_name)
    return score_folder(out, root, split)


def refine_and_score(run_dir: Path, root: Path, name: str, *options: str) -> float:
    """Pseudo-label mIoU (train) of ``wsss refine OPTIONS`` on the run's CAMs, into ``run_dir/name`` (resumes)."""
    out = run_dir / name
    return _scored(out, root, "train", [wsss_command(), "-q", "refine", "--root", str(root), "--split", "train",
                                        "--cams", str(run_dir / "cams"), "--out", str(out), "--workers", "1",
                                        *options], "refine.log")


def predict_and_score(checkpoint: Path, root: Path, out: Path, *options: str) -> float:
    """DeepLab val mIoU of ``wsss predict OPTIONS`` with ``checkpoint`` (the pipeline's test scales), into ``out``
    (resumes)."""
    return _scored(out, root, "val", [wsss_command(), "-q", "predict", "--root", str(root), "--split", "val",
                                      "--checkpoint", str(checkpoint), "--out", str(out), "--scales", "0.75,1.0,1.25",
                                      "--workers", "0", *options], "predict.log")


def quality_arguments(description: str, md_name: str) -> argparse.ArgumentParser:
    """The options every quality bench takes: ``--work``, ``--seeds``, ``--jobs``, ``--md``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", type=Path, default=Path("work/bench"))
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0, 1, 2],
                        help="comma-separated seeds")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--md", type=Path, default=Path(__file__).with_name(md_name))
    return parser


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(value) for value in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


def fmt(values: Sequence[float] | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"52.5 ± 1.2"`` (mean ± sample std over seeds, scaled; "–" when there is nothing)."""
    values = [value for value in (values or []) if value is not None]
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def per_seed(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """The seeds' values, ``"52.1 / 53.0 / 51.8"``."""
    return " / ".join("–" if value is None else f"{scale * value:.{digits}f}" for value in values)
