"""What the experiment notebooks (04, 06) share: train a run into its folder unless a finished run
with the same settings is already there."""
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


def finished(path, argv):
    """The run's summary.json, if it exists and was trained with these settings. Settings added to
    the code after the run was trained count as their defaults; how a run was started (out_dir,
    threads, ...) and other datasets' settings do not count."""
    try:
        with open(os.path.join(path, "summary.json")) as fh:
            summary = json.load(fh)
    except (OSError, ValueError):
        return None
    run, model = train.parse_args(argv)
    done = summary["config"]
    ignored = train.INVOCATION + ("threads",) + tuple(set(data.settings()) - set(data.setting_keys(run["dataset"])))
    same_run = all(done["run"].get(k, train.DEFAULTS[k]) == v for k, v in run.items() if k not in ignored)
    same_model = all(done["model"].get(k, MODEL_DEFAULTS[k]) == v for k, v in model.items())
    return summary if same_run and same_model else None


def ensure(path, argv, small=False, label=""):
    """Train argv into path unless finished(): in-process and silent in the small mode (the tests),
    else in a subprocess (its own threads), printing the wall time. -> the summary."""
    argv = list(argv) + [f"--out_dir={path}", "--overwrite"]
    summary = finished(path, argv)
    if summary:
        return summary
    if small:
        with contextlib.redirect_stdout(io.StringIO()):
            return train.main(argv)
    t0 = time.time()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], capture_output=True, text=True)
    assert res.returncode == 0, f"{label or path}: {res.stderr[-500:]}"
    print(f"trained {label or path}: {time.time() - t0:.0f} s", flush=True)
    return finished(path, argv)
