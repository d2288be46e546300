"""Group advantage estimators, registered by name; pure numpy.

Every estimator maps rewards shaped [groups, G] (one row per prompt, its G samples; rows are never mixed)
to advantages of the same shape:

    fn(rewards: np.ndarray, *, all_gather: AllGather) -> np.ndarray

`all_gather` returns the rewards of every host, concatenated, given this host's; estimators that use
global statistics (reinforce, grpo_clip2) compute them over its result, so groups stay on their host while
the statistics are global. The default is the identity (one host).

Definitions (r: rewards; per group g: mean_g, std_g the population mean and standard deviation of its G
rewards; global: mean, std over all rewards of all hosts; EPS = 1e-4):

- grpo:      (r - mean_g) / (std_g + EPS)
- dr_grpo:   r - mean_g                                (Dr. GRPO: no std division)
- rloo:      r - mean of the other G-1 rewards = G / (G-1) * (r - mean_g)
- reinforce: (r - mean) / (std + EPS)                  (a global z-score, no grouping)
- reinforce_pp: c = r - mean_g, then (c - mean(c)) / (std(c) + EPS) over all c of all hosts
                                                       (REINFORCE++ with a group baseline, Hu et al.
                                                        2025, arXiv 2501.03262: the group mean removed,
                                                        then the batch normalised as a whole)
- grpo_clip2, kept for comparison: "grpo + 0.02 x global z-score, positives rescaled so the group max
  is 1.5, floor -4 x group max"; precisely, per group:
      a   = grpo(r) + 0.02 * reinforce(r)
      m   = max_g(a)
      a   = where(a > 0, a * 1.5 / m, a)               (only when m > 0: the group max becomes 1.5)
      a   = max(a, -4 * max_g(a))                      (the floor uses the rescaled max, so it is -6
                                                        whenever the group has a positive advantage)
  Known sign flip: in an all-equal group the grpo term is 0 and every member gets the same 0.02 * z. If
  the group is below the global mean (z < 0), m < 0 and the floor -4 * m is positive, so every member is
  raised to -4 * m = 0.08 * |z| > 0: an all-wrong group is pushed *up*. Above the global mean every
  member is rescaled to exactly 1.5, so an all-right group gets the largest advantage there is.

`reinforce` needs no groups at all, so it also takes G = 1 (one sample per prompt, as grpo's estimator
switch samples); every other estimator needs G >= 2.

In grpo, dr_grpo and rloo an all-equal group gets exactly 0 (the centred rewards are set to 0 rather
than left as rounding noise of order 1e-17 / EPS).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mllmjax.errors import BadInputError
from mllmjax.settings import DEFAULTS

EPS = 1e-4
AllGather = Callable[[np.ndarray], np.ndarray]
Estimator = Callable[..., np.ndarray]

ESTIMATORS: dict[str, Estimator] = {}


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def register_advantage(
    name: str, fn: Estimator | None = None
) -> Estimator | Callable[[Estimator], Estimator]:
    """Register an estimator under `name` (usable as a decorator)."""

    def add(f: Estimator) -> Estimator:
        existing = ESTIMATORS.get(name)
        if existing is not None and existing is not f:
            raise BadInputError(f"a different advantage estimator is already registered as {name!r}")
        ESTIMATORS[name] = f
        return f

    return add if fn is None else add(fn)


def zero_variance(rewards: np.ndarray) -> np.ndarray:
    """[groups] bool: the group's rewards are all exactly equal (max == min; np.std of equal floats can
    be a rounding error away from 0)."""
    return rewards.max(axis=1) == rewards.min(axis=1)


def _centred(rewards: np.ndarray) -> np.ndarray:
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    return np.where(zero_variance(rewards)[:, None], 0.0, centred)


def _global_z(rewards: np.ndarray, all_gather: AllGather) -> np.ndarray:
    everything = np.asarray(all_gather(rewards.reshape(-1)), dtype=np.float64)
    return (rewards - everything.mean()) / (everything.std() + EPS)


def grpo(rewards: np.ndarray, *, all_gather: AllGather = _identity) -> np.ndarray:
    """(r - mean_g) / (std_g + 1e-4), population std; 0 for an all-equal group."""
    return _centred(rewards) / (rewards.std(axis=1, keepdims=True) + EPS)


def dr_grpo(rewards: np.ndarray, *, all_gather: AllGather = _identity) -> np.ndarray:
    """r - mean_g (Dr. GRPO: no division by the group std)."""
    return _centred(rewards)


def rloo(rewards: np.ndarray, *, all_gather: AllGather = _identity) -> np.ndarray:
    """r minus the mean of the other G-1 rewards of its group."""
    g = rewards.shape[1]
    return _centred(rewards) * (g / (g - 1))


def reinforce(rewards: np.ndarray, *, all_gather: AllGather = _identity) -> np.ndarray:
    """(r - mean) / (std + 1e-4) over all rewards of all hosts (via all_gather)."""
    return _global_z(rewards, all_gather)


def reinforce_pp(rewards: np.ndarray, *, all_gather: AllGather = _identity) -> np.ndarray:
    """REINFORCE++-baseline: r - mean_g, then a z-score over the whole batch of all hosts (via all_gather)."""
    centred = _centred(rewards)
    everything = np.asarray(all_gather(centred.reshape(-1)), dtype=np.float64)
    return (centred - everything.mean()) / (everything.std() + EPS)


def grpo_clip2(rewards: np.ndarray, *, all_gather: AllGather = _identity) -> np.ndarray:
    """grpo plus a global z-score term, clipped (see the module docstring for the exact definition).

    a = grpo + 0.02 * global z; positives scaled so the group max is 1.5; floor -4 x the group max.
    Sign flip: an all-equal group below the global mean (e.g. all wrong) has max a = 0.02 z < 0, so the
    floor -4 x max is positive and every member gets +0.08 |z|: the group is reinforced, not penalised.
    An all-equal group above the global mean gets 1.5 for every member.
    """
    a = grpo(rewards) + 0.02 * _global_z(rewards, all_gather)
    m = a.max(axis=1, keepdims=True)
    scale = np.where(m > 0, 1.5 / np.where(m > 0, m, 1.0), 1.0)
    a = np.where(a > 0, a * scale, a)
    return np.maximum(a, -4.0 * a.max(axis=1, keepdims=True))


# Estimators that need no group: they take one sample per prompt (a global statistic is the baseline).
SINGLE_SAMPLE = ("reinforce",)

register_advantage("grpo", grpo)
register_advantage("dr_grpo", dr_grpo)
register_advantage("rloo", rloo)
register_advantage("reinforce", reinforce)
register_advantage("reinforce_pp", reinforce_pp)
register_advantage("grpo_clip2", grpo_clip2)


def get_estimator(name: str) -> Estimator:
    fn = ESTIMATORS.get(name)
    if fn is None:
        raise BadInputError(f"unknown advantage estimator {name!r}; known: {', '.join(sorted(ESTIMATORS))}")
    return fn


def compute_advantages(
    rewards: np.ndarray, name: str = DEFAULTS.advantage, *, all_gather: AllGather | None = None
) -> np.ndarray:
    """Advantages [groups, G] for rewards [groups, G] with the estimator registered as `name`."""
    fn = get_estimator(name)
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0:
        raise BadInputError(
            f"rewards must be shaped [groups, G] with at least one group, got shape {r.shape}"
        )
    if r.shape[1] < 2 and name not in SINGLE_SAMPLE:
        raise BadInputError(
            f"group size G must be >= 2 for group advantages, got G={r.shape[1]} "
            "(sample several completions per prompt: -G/--group-size)"
        )
    if not np.isfinite(r).all():
        raise BadInputError("rewards must be finite numbers")
    out = np.asarray(fn(r, all_gather=all_gather or _identity), dtype=np.float64)
    if out.shape != r.shape:
        raise BadInputError(f"estimator {name!r} returned shape {out.shape} for rewards of shape {r.shape}")
    return out
