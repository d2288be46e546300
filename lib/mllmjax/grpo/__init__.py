"""The GRPO loop in one process: rollout -> score -> PPO epochs, step after step, in a run directory.

`GRPORun(cfg, run_dir, hooks=...).run()` is what `mllmjax grpo` calls. Each step calls the same library
functions as the single commands (`make_rollouts`, `score_records`, `batch_from_records` +
`Trainer.train_on_batch`, `write_checkpoint`), with the current parameters in memory: no disk round trip
between the stages.

Modules: `config` (GRPOConfig, recipes, config files), `run_dir` (the files of a run), `context` (opening
a run: the frozen `RunContext` and the small mutable `RunState`), `stages` (sample + score, train,
evaluate), `loop` (`GRPORun`: the steps, checkpoints, hooks), `report` (the `Hook` interface; plots,
TensorBoard, W&B; which terms are off; the ETA), `faults` (test-only kill injection).

Run directory:

    RUN/config.json         every resolved setting (GRPOConfig), plus the resolved start checkpoint
    RUN/metrics.jsonl       one JSON object per step (rewards, accuracy, KL, entropy, clip fraction,
                            sampler/trainer log-prob gap, lengths, truncation, zero-variance fraction, times, compile time, tokens/s,
                            eval/*); step 0 is the evaluation before training, when there is one
    RUN/checkpoints/step_N/ checkpoint artifacts with opt_state/ (every --save-every steps and at the
                            end; the last --keep are kept)
    RUN/rollouts/step_N.jsonl  the scored records of each step (--save-rollouts)
    RUN/plots/*.png         reward, accuracy, KL, entropy and length curves, drawn when the run ends or stops

Design decisions:
- Exact resume. Everything a step consumes is a function of (seed, step) or is saved in the checkpoint:
  the prompts come from a cursor into a per-epoch permutation of the training split (seeded; the cursor
  is saved, since dynamic sampling consumes a variable number of prompts), the sampler's seed is derived
  from (seed, step, round), and the trainer's state (params, optimizer state, update count, RNG) is
  saved whole. So resuming from step_N and running to the end gives the same parameters as a run that
  was never stopped (tested bit for bit after kill -9 at several points).
- Crash safety. Checkpoints are written atomically (temp dir + rename), so a directory named step_N is
  always whole; stale temp dirs are removed on resume. Old checkpoints are renamed away before they are
  deleted. metrics.jsonl is appended once per step and cut back to the resumed step on resume.
- Interrupts. `stop_requested()` is polled between steps (in a multi-host run, all processes stop
  when any one was asked to): the loop then saves a checkpoint and returns `stopped`. A
  KeyboardInterrupt inside a step abandons that step (its updates ran on a copy of the train state, so
  the state it started from is intact) and saves the last finished one.
- Reporting is hooks: the loop calls each `Hook` with progress events, every metrics row and the result,
  and knows no display or sink.
- The embedded default (SmolLM2-135M-Instruct on the built-in arithmetic task) is a recipe file like any
  other (`recipes/embedded-default.toml`), applied when neither a model nor data is named.
- Dynamic sampling (DAPO): groups whose rewards are all equal carry no signal; with `dynamic_sampling`
  the loop samples further prompts (up to `max_sampling_rounds` rounds) until `prompts_per_step` groups
  with signal are collected, each round at least a full `batch_size` decode batch of prompts (DAPO's
  over-sampling; surplus groups are dropped). Advantages are per group, so this needs a per-group estimator.
"""

from __future__ import annotations

import importlib
from typing import Any

# What the package exports, by the submodule that defines it. Loaded on first use, so importing
# `mllmjax.grpo.config` (the CLI does, to build its flags) does not load JAX through the loop's modules.
_EXPORTS = {
    "config": ("EMBEDDED_RECIPE", "GRPOConfig", "build_config", "normalise_settings", "read_config_file",
               "recipe_names"),
    "context": ("RunContext", "RunState"),
    "loop": ("GRPORun", "RunResult"),
    "report": ("Hook", "eta_seconds", "held_out_change", "held_out_line", "steady_step_seconds", "terms_off"),
    "run_dir": ("RunDir", "checkpoint_steps", "read_metrics", "read_run_config"),
    "stages": ("derived_seed", "problem_index"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'mllmjax.grpo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mllmjax.grpo.{module}"), name)


__all__ = sorted(_MODULE_OF)
