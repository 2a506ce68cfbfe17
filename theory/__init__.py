"""theory: the static-routing lower bound and the consolidation curve, as code that the notebooks
(notebooks/01_lower_bound.py .. 03_srcd_curves.py) and the tests both call.

One idea per file:
  instances.py      task instances: fixed families, and every draw of a pool unknown in advance
  lower_bound.py    static vs consolidating schemes: the bound before consolidation (any scheme),
                    the bound at deployment (static schemes), their proofs and brute forces
  consolidation.py  a learner that consolidates a pattern after k exposures: closed form, simulation
  zipf.py           why attention falls as a power law: a Zipf(s) pool gives gamma = 1 - 1/s
  figures.py        where the notebooks save their plots
  srcd_fit.py       a training run's metrics against the theory: floor, expected curve, fitted gamma

Glossary (code -> the symbols of lower_bound.py's docstring and RESULTS.md, "Theory"):
  n  tokens per sequence        f  query frequency, q = f n   r  recurring share of queries
  P  pool size                  k  exposures to consolidate   b  sequences per training step
  t  training step              delta  allowed error          c  chance an unrouted query is right
  C  consolidated keys          s  Zipf exponent of the pool  gamma  exponent of attention vs t
"""
from .instances import BIND, QUERY, SIGNAL, Family, PoolDraws, enumerate_pool_draws, make_family
from .lower_bound import (before_consolidation_bound, brute_force, consolidated_cost,
                          consolidating_route, deployment_bound, deployment_brute_force,
                          deployment_evaluate, deployment_schemes, evaluate, static_schemes)
from .consolidation import (at, closed_form, closed_form_limit, cumulative_attention,
                            cumulative_excess, expected_attention, poisson_form, simulate,
                            uniform_pool, z_scores)
from .zipf import (derive_tail, fit_power_law, frontier, gamma_of_s, power_law_steps,
                   power_law_window, s_of_gamma, tail_asymptote, unconsolidated_mass, zipf_pool)

__all__ = [  # what `import theory` offers the notebooks and the tests
    "BIND", "QUERY", "SIGNAL", "Family", "PoolDraws", "enumerate_pool_draws", "make_family",
    "before_consolidation_bound", "brute_force", "consolidated_cost", "consolidating_route",
    "deployment_bound", "deployment_brute_force", "deployment_evaluate", "deployment_schemes",
    "evaluate", "static_schemes",
    "at", "closed_form", "closed_form_limit", "cumulative_attention", "cumulative_excess",
    "expected_attention", "poisson_form", "simulate", "uniform_pool", "z_scores",
    "derive_tail", "fit_power_law", "frontier", "gamma_of_s", "power_law_steps", "power_law_window",
    "s_of_gamma", "tail_asymptote", "unconsolidated_mass", "zipf_pool",
]
