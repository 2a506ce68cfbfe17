"""What the experiment notebooks (04, 06, 07, 08) share: train a run into its folder unless a
finished run with the same settings is already there, continuing one that was interrupted."""
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import train  # noqa: E402
from cram import CramConfig  # noqa: E402

MODEL_DEFAULTS = {f.name: f.default for f in fields(CramConfig)}


def same_settings(done_run, done_model, argv):
    """Whether a run's recorded settings are argv's. Settings added to the code after the run was
    trained count as their defaults; how a run was started (out_dir, threads, checkpoint spacing,
    ...) and other datasets' settings do not count. A run with a model setting the code no longer
    has is another run (its checkpoint would not load)."""
    if set(done_model) - set(MODEL_DEFAULTS):
        return False
    run, model = train.parse_args(argv)
    ignored = (train.INVOCATION + ("threads", "ckpt_interval")
               + tuple(set(data.settings()) - set(data.setting_keys(run["dataset"]))))
    same_run = all(done_run.get(k, train.DEFAULTS[k]) == v
                   for k, v in run.items() if k not in ignored)
    return same_run and all(done_model.get(k, MODEL_DEFAULTS[k]) == v for k, v in model.items())


def finished(path, argv):
    """The run's summary.json, if it exists and was trained with these settings."""
    try:
        with open(os.path.join(path, "summary.json")) as fh:
            summary = json.load(fh)
    except (OSError, ValueError):
        return None
    config = summary["config"]
    return summary if same_settings(config["run"], config["model"], argv) else None


def interrupted(path, argv):
    """The step of path's checkpoint if it was saved by a run with these settings that did not
    finish (a session or machine that ended mid-run), else None: ensure continues it from there."""
    try:
        ckpt = train.load_checkpoint(os.path.join(path, "ckpt.pt"))
    except train.ConfigError:
        return None
    return ckpt["step"] if same_settings(ckpt["run"], ckpt["model_args"], argv) else None


def ensure(path, argv, small=False, label=""):
    """Train argv into path unless finished(), continuing an interrupted() run (train.py's --resume;
    exactly as uninterrupted where the thread count is the same) instead of starting it again:
    in-process and silent in the small mode (the tests), else in a subprocess (its own threads),
    printing the wall time. -> the summary."""
    argv = list(argv) + [f"--out_dir={path}"]
    summary = finished(path, argv)
    if summary:
        return summary
    step = interrupted(path, argv)
    argv.append("--overwrite" if step is None else "--resume")
    if small:
        with contextlib.redirect_stdout(io.StringIO()):
            return train.main(argv)
    t0 = time.time()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"{label or path}: {res.stderr[-500:]}"
    resumed = "" if step is None else f" (resumed at step {step})"
    print(f"trained {label or path}: {time.time() - t0:.0f} s{resumed}", flush=True)
    return finished(path, argv)
