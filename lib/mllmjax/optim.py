"""Optimizers and the learning-rate schedule, counted in optimizer updates.

Design decisions:
- Lion or AdamW from optax, after global-norm clipping (1.0). Optimizers are registered by name so a
  flag picks one and a user can add one.
- The schedule's clock is the optimizer update: a run of S steps x E PPO epochs x M minibatches makes
  S * E * M updates, and that is the schedule's length, so the LR reaches 0 at the end of the run and
  not earlier.
- Warm-up is linear over the first W = max(1, round(warmup_frac * total)) updates and its first update
  already has LR peak / W (no update is wasted at LR 0). Update u (1-based) gets peak * u / W for
  u <= W, then peak * (1 + cos(pi * (u - W) / (total - W + 1))) / 2, so the last update also has a
  small positive LR and the LR would reach 0 at update total + 1. Updates past `total` get 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
import optax

from mllmjax.errors import BadInputError
from mllmjax.settings import DEFAULTS


def total_updates(steps: int, ppo_epochs: int, minibatches: int) -> int:
    """Optimizer updates in a run: the schedule's length."""
    for name, value in (("steps", steps), ("ppo_epochs", ppo_epochs), ("minibatches", minibatches)):
        if value < 1:
            raise BadInputError(f"{name} must be >= 1, got {value!r}")
    return steps * ppo_epochs * minibatches


def warmup_cosine(peak_lr: float, total: int, warmup_frac: float = DEFAULTS.warmup) -> optax.Schedule:
    """LR as a function of the number of updates already applied (optax's count, 0-based)."""
    if total < 1:
        raise BadInputError(f"the schedule needs at least one update, got total={total!r}")
    warmup = max(1, round(warmup_frac * total))
    decay = total - warmup + 1

    def schedule(count: jnp.ndarray) -> jnp.ndarray:
        u = jnp.asarray(count, jnp.float32) + 1.0  # the 1-based index of the update being made
        warm = peak_lr * u / warmup
        cos = peak_lr * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(u - warmup, 0.0, decay) / decay))
        lr = jnp.where(u <= warmup, warm, cos)
        return jnp.where(u > total, 0.0, lr).astype(jnp.float32)

    return schedule


OptimizerFactory = Callable[[optax.Schedule, float], optax.GradientTransformation]
OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    def deco(fn: OptimizerFactory) -> OptimizerFactory:
        OPTIMIZERS[name] = fn
        return fn

    return deco


@register_optimizer("lion")
def _lion(lr: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
    return optax.lion(lr, b1=0.9, b2=0.99, weight_decay=weight_decay)


@register_optimizer("adamw")
def _adamw(lr: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = DEFAULTS.optimizer
    peak_lr: float = DEFAULTS.lr
    warmup_frac: float = DEFAULTS.warmup
    weight_decay: float = DEFAULTS.weight_decay
    clip_norm: float | None = 1.0
    total_updates: int = 1

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise BadInputError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not self.peak_lr > 0:
            raise BadInputError(f"learning rate must be > 0, got {self.peak_lr!r}")
        if not 0 <= self.warmup_frac < 1:
            raise BadInputError(f"warmup fraction must be in [0, 1), got {self.warmup_frac!r}")
        if self.weight_decay < 0:
            raise BadInputError(f"weight decay must be >= 0, got {self.weight_decay!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise BadInputError(f"gradient clip norm must be > 0, got {self.clip_norm!r}")
        if self.total_updates < 1:
            raise BadInputError(f"total_updates must be >= 1, got {self.total_updates!r}")

    def schedule(self) -> optax.Schedule:
        return warmup_cosine(self.peak_lr, self.total_updates, self.warmup_frac)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then the named optimizer on the warm-up + cosine schedule."""
    opt = OPTIMIZERS[cfg.name](cfg.schedule(), cfg.weight_decay)
    if cfg.clip_norm is None:
        return opt
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
