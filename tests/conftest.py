"""Test setup: 8 fake CPU devices for sharding tests (set before jax is imported anywhere), float32
matmuls at full precision, and builders of tiny random HF models for parity tests."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
