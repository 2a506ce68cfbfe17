"""A CRAM training run read against the theory: SRCD's settings as the theory's parameters, the
consolidation threshold k fitted to the measured curve, and the power-law exponent gamma.

The generator (data.SRCD) puts n_query queries in each length-n sequence, n_recurring of them
recurring, their keys drawn from a pool of P = srcd_pool patterns, uniformly or, with srcd_zipf = s,
with p_i ~ i^-s (data.SRCD.pool_p). So the theory's
parameters are n = srcd_len, f = n_query / n and r = n_recurring / n_query (the generator's rounded
counts, asked of the SRCD object, not the nominal ratios), a uniform pool of P, b = batch_size, and
its floor f (1 - r) n / n is the share of tokens that are novel queries, data.SRCD.floor. One
difference for the uniform pool: a pattern appears at most once per sequence (drawn without
replacement), the theory draws with replacement; the mean exposures, r b f n / P per step, are the
same, the spread a little smaller. A Zipf pool is drawn with replacement, as the theory draws.
"""
import json
import os

import numpy as np

from . import consolidation as cons
from .zipf import unconsolidated_mass


def read_run(run_dir):
    """-> (eval rows sorted by step, one per step, the last written winning; the run's settings;
    summary.json or None). The settings come from summary.json, or, for a run still going, from
    its checkpoint."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = {r["step"]: r for r in map(json.loads, filter(str.strip, fh)) if r["kind"] == "eval"}
    summary, path = None, os.path.join(run_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as fh:
            summary = json.load(fh)
        run = summary["config"]["run"]
    else:
        import torch
        ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
        run = ckpt["run"]
    return [rows[s] for s in sorted(rows)], run, summary


def srcd_params(run):
    """The theory's (n_, f_, r_, p, b_) for expected_attention, from a run's settings."""
    import data  # the repository root's data.py (and torch): only when a run is read
    task = data.make({**data.settings(), **run})  # settings added since the run have their defaults
    return dict(n_=task.len, f_=task.n_query / task.len, r_=task.n_recurring / task.n_query,
                p=task.pool_p, b_=run["batch_size"])


def floor(prm):
    return prm["f_"] * (1 - prm["r_"])


def unconsolidated(steps, k, prm):
    """Share of recurring queries still on attention at each step:
    sum_i p_i P(Bin(N_t, r p_i) < k)."""
    N_t = np.round(np.asarray(steps, float)[:, None] * prm["b_"] * prm["f_"] * prm["n_"])  # a count
    return (prm["p"] * cons.binom_cdf_below(k, N_t, prm["r_"] * prm["p"])).sum(-1)


def attention(steps, k, prm):
    """Expected share of tokens on attention, f [(1 - r) + r unconsolidated]:
    expected_attention / n."""
    return prm["f_"] * ((1 - prm["r_"]) + prm["r_"] * unconsolidated(steps, k, prm))


def fit_k(steps, measured, prm, num=60):
    """k by least squares of unconsolidated() against the measured share, over a geometric grid of
    integers up to twice the mean exposures a pattern has had by the last step (larger k keep the
    curve at 1 throughout). -> (k, lo, hi): the best k and the grid range within 10% of its
    error."""
    exposures = prm["r_"] * prm["b_"] * prm["f_"] * prm["n_"] * prm["p"].max() * max(steps)
    grid = np.unique(np.geomspace(1, 2 * exposures + 2, num).round().astype(int))
    sse = np.array([((unconsolidated(steps, k, prm) - measured) ** 2).sum() for k in grid])
    ok = grid[sse <= 1.1 * sse.min() + 1e-9]
    return int(grid[sse.argmin()]), int(ok.min()), int(ok.max())


def fit_k_log(M, measured, p, num=80):
    """k for a Zipf run, whose measured share spans decades: least squares of log U(M; k)
    (zipf.unconsolidated_mass, M the recurring exposures before each evaluation) against the log
    of the measured share (a linear fit would see only the first points), over a geometric grid of
    integers 1 .. 10^6. -> (k, lo, hi): the best k and the grid range within 10% of its error."""
    grid = np.unique(np.geomspace(1, 1e6, num).round().astype(int))
    log_measured = np.log(np.asarray(measured, float))
    log_u = lambda k: np.log(np.maximum(unconsolidated_mass(M, p, k), 1e-300))
    sse = np.array([((log_u(k) - log_measured) ** 2).sum() for k in grid])
    ok = grid[sse <= 1.1 * sse.min() + 1e-9]
    return int(grid[sse.argmin()]), int(ok.min()), int(ok.max())


def fit_gamma(steps, share, start=0, resamples=2000, seed=0):
    """gamma, minus the log-log slope of `share` against the step, over steps >= start (and >= 1)
    where the share is positive; what the theory predicts it for is the recurring queries' share
    still on attention, U ~ C t^-gamma. -> (gamma, (lo, hi), mask): the 95% interval from a
    bootstrap of the fitted line's residuals (the points are one run's evaluations, not
    independent draws: the interval is the fit's, not the run-to-run spread). gamma and the
    interval are nan below 4 usable points."""
    steps, share = np.asarray(steps, float), np.asarray(share, float)
    mask = (steps >= max(start, 1)) & np.isfinite(share) & (share > 0)
    if mask.sum() < 4:
        return float("nan"), (float("nan"), float("nan")), mask
    x, y = np.log(steps[mask]), np.log(share[mask])
    slope, icpt = np.polyfit(x, y, 1)
    resid = y - (slope * x + icpt)
    rng = np.random.default_rng(seed)
    boot = [np.polyfit(x, slope * x + icpt + rng.choice(resid, len(x)), 1)[0]
            for _ in range(resamples)]
    lo, hi = np.percentile(-np.array(boot), [2.5, 97.5])
    return float(-slope), (float(lo), float(hi)), mask
