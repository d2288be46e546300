"""The GRPO step loop: rollout -> score -> PPO epochs, step after step, in a run directory."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mllmjax.convert import resolve_model
from mllmjax.errors import ArtifactError, BadInputError, OutputExistsError
from mllmjax.grpo.config import GRPOConfig
from mllmjax.grpo.report import REPORTERS, draw_plots, make_reporter
from mllmjax.grpo.run_dir import (
    CHECKPOINTS,
    CONFIG_FILE,
    METRICS_FILE,
    RUN_FORMAT,
    _write_atomic,
    checkpoint_steps,
    read_metrics,
    read_run_config,
)


def problem_index(cursor: int, n: int, seed: int) -> int:
    """The dataset index of the cursor-th prompt of a run: epochs of seeded permutations."""
    epoch, pos = divmod(cursor, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[pos])


def derived_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (the sampler's seed for a step and sampling round)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int  # the last finished step
    status: str  # "done", "stopped" (asked to stop between steps), "interrupted" (a step abandoned)
    checkpoint: Path | None
    metrics: list[dict[str, Any]]


Event = Callable[[str, dict[str, Any]], None]


class GRPORun:
    """One run directory. `run()` trains from the start or from its last checkpoint (resume=True)."""

    def __init__(self, cfg: GRPOConfig, run_dir: str | os.PathLike[str], *, resume: bool = False,
                 force: bool = False, on_event: Event | None = None):  # fmt: skip
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.force = force
        self.emit: Event = on_event or (lambda kind, data: None)
        if not resume and self.run_dir.exists() and any(self.run_dir.iterdir()) and not force:
            raise OutputExistsError(
                f"{self.run_dir} exists; pass --resume {self.run_dir} to continue it or --force to replace it"
            )
        if resume and not (self.run_dir / CONFIG_FILE).is_file():
            raise ArtifactError(f"{self.run_dir} is not a grpo run directory (no {CONFIG_FILE})")

    # ----------------------------------------------------------------------------- setup
    def _check_memory(self, start: Any, tcfg: Any) -> None:
        """Estimate the memory of a rollout and of one update (prompt length from the first 256
        problems), report both as 'memory' events, and stop before the optimizer state exists if
        either cannot fit."""
        import jax

        from mllmjax import memory
        from mllmjax.rollout import encode_prompt
        from mllmjax.sampling.sampler import MIN_NEW_BUCKET, bucket, decode_windows, prompt_bucket, unrolled
        from mllmjax.training import padded_shape

        cfg = self.cfg
        rcfg = cfg.rollout_config(seed=0)
        longest = max(len(encode_prompt(self.tokenizer, p, rcfg)[1]) for p in self.problems[:256])
        dtype = jax.tree.leaves(start.params)[0].dtype.name
        # Not donated: the updates take over a copy, and the state the step started from stays alive
        # beside it (to roll the step back), which is the "new state" of a non-donated update.
        widths = padded_shape(longest, cfg.max_new_tokens)
        update = memory.for_train_config(
            start.cfg, tcfg, rows=cfg.prompts_per_step * cfg.group_size // cfg.minibatches,
            seq_len=sum(widths), completion_len=widths[1], param_dtype=dtype, mesh=self.mesh,
        )  # fmt: skip
        # A rollout decodes up to batch-size rows (whole groups) while the train state, the KL reference
        # and, with --sample-mesh, a resharded copy of the parameters are alive.
        # Multi-host: a host decodes its share of the prompts.
        share = -(-cfg.prompts_per_step // jax.process_count())
        prompts = bucket(min(max(1, cfg.batch_size // cfg.group_size), share))
        decode = memory.estimate_sampling(
            start.cfg, rows=prompts * cfg.group_size, param_dtype=dtype, compute_dtype=cfg.compute_dtype,
            cache_len=decode_windows(
                prompt_bucket(longest), bucket(cfg.max_new_tokens, MIN_NEW_BUCKET)
            ),
            mesh=self.sample_mesh, out_major=unrolled(),
        )  # fmt: skip
        rollout = memory.MemoryEstimate(
            {
                "params": update.parts["params"],
                "optimizer": update.parts["optimizer"],
                "reference": update.parts["reference"],
                "sampling copy": decode.parts["params"] if self.sample_mesh is not self.mesh else 0,
                "decode_weights": decode.parts.get("decode_weights", 0),
                "kv_cache": decode.parts["kv_cache"],
                "logits": decode.parts["logits"],
            },
            update.available,
        )
        for name, estimate in (("rollout", rollout), ("update", update)):
            self.emit("memory", {"line": estimate.describe(name), "bytes": estimate.total})
        rollout.check("use a smaller --batch-size or --max-new-tokens, or more devices in --sample-mesh")
        update.check(memory.TRAIN_HINT)

    def _setup(self) -> None:
        import jax

        from mllmjax.checkpoint import META_FILE, load_checkpoint, resolve_dtype
        from mllmjax.data import load_problems
        from mllmjax.distributed import barrier, decode_mesh, is_primary
        from mllmjax.sharding import make_mesh
        from mllmjax.trainer import Trainer
        from mllmjax.training import restore_train_state

        cfg = self.cfg
        for name in cfg.report_to:  # a missing extra fails before anything is written
            REPORTERS[name].check()
        # Multi-host: every process runs the loop; each samples and scores its share of the prompts,
        # the scored records are gathered, and process 0 writes the run's files.
        self.primary = is_primary()
        if self.resume:
            saved = read_run_config(self.run_dir)
            self.start_ckpt = Path(saved["start_checkpoint"])
        else:
            if self.run_dir.exists() and self.force and self.primary:
                shutil.rmtree(self.run_dir)
            barrier("grpo:fresh-run-dir")
            if jax.process_count() > 1 and not (Path(cfg.model) / META_FILE).is_file():
                raise BadInputError(
                    f"a multi-host run needs --model to be a converted checkpoint on storage every host "
                    f"sees; run `mllmjax convert {cfg.model} -o DIR` once and pass --model DIR"
                )
            self.emit("phase", {"phase": "model"})
            self.start_ckpt = resolve_model(
                cfg.model, dtype=cfg.dtype, on_convert=lambda out: self.emit("convert", {"out": out})
            )
        self.mesh = make_mesh(cfg.mesh)
        if jax.process_count() > 1:  # each host decodes its share of the prompts on its own devices
            flag = "--sample-mesh" if cfg.sample_mesh else "--mesh"
            self.sample_mesh = decode_mesh(cfg.sample_mesh or cfg.mesh, flag)
        else:
            self.sample_mesh = make_mesh(cfg.sample_mesh) if cfg.sample_mesh else self.mesh
        dtype = resolve_dtype(cfg.dtype)
        # Problems first: a bad --data fails before the model is loaded.
        self.problems = load_problems(cfg.data, split=cfg.split, question_field=cfg.question_field,
                                      answer_field=cfg.answer_field)  # fmt: skip
        self.eval_problems = []
        if cfg.eval_every:
            self.eval_problems = load_problems(
                cfg.eval_data or cfg.data, split=cfg.eval_split, question_field=cfg.question_field,
                answer_field=cfg.answer_field, num=cfg.eval_num_prompts,
            )  # fmt: skip
        start = load_checkpoint(self.start_ckpt, mesh=self.mesh, dtype=dtype)
        self.model_cfg = start.cfg
        self.hf_config = start.hf_config
        self.tokenizer = start.tokenizer()
        self.stop_ids = start.stop_ids
        self.pad_id = self.tokenizer.pad_token_id or 0
        tcfg = cfg.train_config()
        self._check_memory(start, tcfg)
        self.trainer = Trainer(
            start.cfg, tcfg, ref_params=start.params if cfg.beta > 0 else None, donate=True, mesh=self.mesh
        )
        self.cursor = 0
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        if self.resume:
            steps = checkpoint_steps(self.run_dir)
            self._clean_partial()
            if steps:
                last = self.run_dir / CHECKPOINTS / f"step_{steps[-1]}"
                ckpt = load_checkpoint(last, mesh=self.mesh, dtype=dtype)
                self.state = restore_train_state(ckpt, self.trainer)
                grpo_meta = ckpt.meta.get("grpo", {})
                self.step = int(grpo_meta.get("step", steps[-1]))
                self.cursor = int(grpo_meta["cursor"])
            else:  # killed before the first checkpoint: start over in the same directory
                self.state = self.trainer.init_state(start.params, self._train_rng())
            self.metrics = read_metrics(self.run_dir, upto=self.step)
            if self.primary:
                _write_atomic(
                    self.run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in self.metrics)
                )
        else:
            if self.primary:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                config = {"format": RUN_FORMAT, **cfg.to_dict(), "start_checkpoint": str(self.start_ckpt),
                          "model_config": self.model_cfg.family, "devices": jax.device_count(),
                          "processes": jax.process_count()}  # fmt: skip
                _write_atomic(self.run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
                (self.run_dir / METRICS_FILE).touch()
            self.state = self.trainer.init_state(start.params, self._train_rng())
        barrier("grpo:setup")
        self.saved_step = self.step if self.resume else -1
        self.reporters = (
            [make_reporter(name, self.run_dir, cfg) for name in cfg.report_to] if self.primary else []
        )

    def _train_rng(self) -> Any:
        import jax

        return jax.random.key_data(jax.random.key(derived_seed(self.cfg.seed, 1)))

    def _clean_partial(self) -> None:
        root = self.run_dir / CHECKPOINTS
        if root.is_dir() and self.primary:
            for d in root.iterdir():
                if d.name.startswith("."):  # an interrupted write or delete
                    shutil.rmtree(d, ignore_errors=True)

    # ----------------------------------------------------------------------------- stages
    def _next_problems(self, count: int) -> list[Any]:
        n = len(self.problems)
        picked = [self.problems[problem_index(self.cursor + i, n, self.cfg.seed)] for i in range(count)]
        self.cursor += count
        return picked

    def _rollout(self, step: int) -> tuple[list[Any], dict[str, Any], dict[str, float]]:
        """Sample and score until the step's batch is full; returns (scored records, score summary of
        the last round, counters)."""
        from mllmjax.rollout import gather_records, host_rollouts
        from mllmjax.scoring import reward_outcomes, score_records

        cfg = self.cfg
        kept: list[Any] = []
        summaries: list[dict[str, Any]] = []
        all_records: list[Any] = []
        rollout_s = score_s = 0.0
        rounds = 0
        groups_sampled = 0
        while len(kept) < cfg.prompts_per_step * cfg.group_size and rounds < cfg.max_sampling_rounds:
            problems = self._next_problems(cfg.prompts_per_step - len(kept) // cfg.group_size)
            t0 = time.perf_counter()
            self.emit("phase", {"phase": "rollout", "round": rounds})
            # This host's share: sampled on its devices, rewards scored here, then every host's joined.
            mine = host_rollouts(
                self.state.params, self.model_cfg, self.tokenizer, problems,
                cfg.rollout_config(seed=derived_seed(cfg.seed, 2, step, rounds)),
                stop_ids=self.stop_ids, policy=f"{self.run_dir}@{step - 1}", first_group=groups_sampled,
                mesh=self.sample_mesh, compute_dtype=cfg.compute_dtype, meta={"step": step, "round": rounds},
                on_batch=lambda tokens, samples: self.emit("rollout_progress", {"tokens": tokens, "samples": samples}),
            )  # fmt: skip
            t1 = time.perf_counter()
            self.emit("phase", {"phase": "score"})
            score_cfg = cfg.score_config()
            pairs = gather_records(list(zip(mine, reward_outcomes(mine, score_cfg), strict=True)))
            records = [record for record, _ in pairs]
            scored, summary = score_records(records, score_cfg, outcomes=[o for _, o in pairs])
            t2 = time.perf_counter()
            rollout_s += t1 - t0
            score_s += t2 - t1
            kept.extend(scored)
            summaries.append(summary)
            all_records.extend(records)
            groups_sampled += len(problems)
            rounds += 1
            if not cfg.dynamic_sampling:
                break
        kept = kept[: cfg.prompts_per_step * cfg.group_size]
        counters = {"rollout_s": rollout_s, "score_s": score_s, "sampling_rounds": rounds,
                    "prompts_sampled": groups_sampled, "groups_trained": len(kept) // cfg.group_size,
                    "completion_tokens": sum(len(r.completion_ids) for r in all_records)}  # fmt: skip
        return kept, _merge_summaries(summaries), counters

    def _evaluate(self, step: int) -> dict[str, float]:
        from mllmjax.evaluation import summarize
        from mllmjax.rollout import gather_records, host_rollouts

        t0 = time.perf_counter()
        self.emit("phase", {"phase": "eval"})
        records = host_rollouts(
            self.state.params, self.model_cfg, self.tokenizer, self.eval_problems,
            self.cfg.rollout_config(seed=derived_seed(self.cfg.seed, 3), group_size=1, greedy=True),
            stop_ids=self.stop_ids, policy=f"{self.run_dir}@{step}", mesh=self.sample_mesh,
            compute_dtype=self.cfg.compute_dtype,
        )  # fmt: skip
        records = gather_records(records)
        result, _ = summarize(records)
        return {"eval/accuracy": result.pass_at_1, "eval/format": result.format_rate,
                "eval/mean_tokens": result.mean_tokens, "eval/truncation_rate": result.truncation_rate,
                "eval/problems": float(result.problems), "eval_s": time.perf_counter() - t0}  # fmt: skip

    def _save(self, step: int) -> Path:
        from mllmjax.checkpoint import copy_side_files, write_checkpoint
        from mllmjax.training import state_extras

        self.emit("phase", {"phase": "checkpoint"})
        out = self.run_dir / CHECKPOINTS / f"step_{step}"

        def side_files(d: Path) -> None:
            copy_side_files(self.start_ckpt, d)
            crash_point("checkpoint", step)

        write_checkpoint(
            out, params=self.state.params, hf_config=self.hf_config, write_tokenizer=side_files,
            source=str(self.start_ckpt), step=step, parent=str(self.start_ckpt), force=True,
            opt_state=state_extras(self.state),
            extra_meta={"reference": str(self.start_ckpt), "updates": int(self.state.step),
                        "grpo": {"run": str(self.run_dir), "step": step, "cursor": self.cursor}},
        )  # fmt: skip
        self.saved_step = step
        self._prune()
        return out

    def _prune(self) -> None:
        root = self.run_dir / CHECKPOINTS
        if not self.primary:
            return
        for old in checkpoint_steps(self.run_dir)[: -self.cfg.keep]:
            src = root / f"step_{old}"
            trash = root / f".trash-step_{old}-{uuid.uuid4().hex[:6]}"
            os.replace(src, trash)  # a whole step_N or none: never a half-deleted one
            shutil.rmtree(trash, ignore_errors=True)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        if not self.primary:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for r in self.reporters:
            r.log(row, int(row["step"]))

    # ----------------------------------------------------------------------------- run
    def run(self, stop_requested: Callable[[], bool] = lambda: False) -> RunResult:
        """Run steps until cfg.steps (or until stop_requested() between steps, or a KeyboardInterrupt
        inside one); a checkpoint of the last finished step is written before returning."""
        from mllmjax.distributed import any_process

        self._setup()
        cfg = self.cfg
        self.emit("start", {"step": self.step, "steps": cfg.steps, "resumed": self.resume,
                            "start_checkpoint": str(self.start_ckpt)})  # fmt: skip
        status = "done"
        # elapsed_s counts the run's own time: a resumed run goes on from the last recorded value.
        before = next((m["elapsed_s"] for m in reversed(self.metrics) if "elapsed_s" in m), 0.0)
        t_start = time.perf_counter() - before
        try:
            if cfg.eval_every and self.step == 0 and not any("eval/accuracy" in m for m in self.metrics):
                row = {"step": 0, **self._evaluate(0)}
                self._append_metrics(row)
                self.metrics.append(row)
                self.emit("eval", row)
            while self.step < cfg.steps:
                # Multi-host: a stop asked of any process stops them all after the same step.
                if any_process(stop_requested()):
                    status = "stopped"
                    break
                step = self.step + 1
                t0 = time.perf_counter()
                state_before, cursor_before = self.state, self.cursor
                try:
                    records, summary, counters = self._rollout(step)
                    crash_point("rollout", step)
                    row = self._train(step, records, summary, counters)
                    if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                        row.update(self._evaluate(step))
                    row["step_s"] = time.perf_counter() - t0
                    row["elapsed_s"] = time.perf_counter() - t_start
                    if cfg.save_rollouts:
                        from mllmjax.records import write_records

                        if self.primary:
                            (self.run_dir / "rollouts").mkdir(exist_ok=True)
                        write_records(records, self.run_dir / "rollouts" / f"step_{step}.jsonl", force=True)
                    self._append_metrics(row)
                except BaseException:
                    # The step is abandoned: back to the state and prompts it started from (a metrics line
                    # it may have written is cut on resume, which keeps steps <= the checkpoint's).
                    self.state, self.cursor = state_before, cursor_before
                    raise
                self.step = step
                self.metrics.append(row)
                crash_point("metrics", step)
                self.emit("step", row)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    self._save(step)
        except KeyboardInterrupt:
            status = "interrupted"
            # Drop a metrics line the abandoned step may have written: the file matches the state.
            if self.primary:
                _write_atomic(
                    self.run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in self.metrics)
                )
        checkpoint = None
        if self.step > 0:
            if self.saved_step != self.step:
                checkpoint = self._save(self.step)
            else:
                checkpoint = self.run_dir / CHECKPOINTS / f"step_{self.step}"
        if self.metrics and self.primary:
            self.emit("phase", {"phase": "plots"})
            draw_plots(self.run_dir, self.metrics)
        for r in self.reporters:
            r.close()
        return RunResult(self.run_dir, self.step, status, checkpoint, self.metrics)

    def _train(
        self, step: int, records: list[Any], summary: dict[str, Any], counters: dict[str, float]
    ) -> dict[str, Any]:
        import jax

        from mllmjax.training import batch_from_records, place_batch

        row: dict[str, Any] = {"step": step}
        row.update(_summary_metrics(summary))
        row.update(counters)
        row["rollout_tok_s"] = counters["completion_tokens"] / max(counters["rollout_s"], 1e-9)
        if not records:  # dynamic sampling found no group with signal: nothing to learn from
            row.update({"updates": int(self.state.step), "train_s": 0.0, "skipped": 1.0})
            return row
        self.emit("phase", {"phase": "train"})
        t0 = time.perf_counter()
        batch = place_batch(batch_from_records(records, pad_id=self.pad_id), self.mesh)
        timings: dict[str, float] = {}

        def on_update(m: dict[str, float]) -> None:
            self.emit("update", m)
            crash_point("update", step)

        # The updates are donated a copy of the state: each writes its new state into the buffers of the
        # one before (no fresh state per update, which would also break up the kept malloc heap, see
        # mllmjax.runtime), and the state the step started from stays whole to roll the step back.
        working = jax.tree.map(lambda x: x.copy(), self.state)  # same placement, new buffers
        self.state, history = self.trainer.train_on_batch(
            working, batch, on_update=on_update, timings=timings
        )
        row["train_s"] = time.perf_counter() - t0
        row["ref_logps_s"] = timings.get("ref_logps_s", 0.0)
        row["updates"] = int(self.state.step)
        for key in (
            "loss",
            "policy_loss",
            "kl",
            "entropy",
            "clip_low",
            "clip_high",
            "ratio_mean",
            "grad_norm",
        ):
            row[key] = float(np.mean([h[key] for h in history]))
        row["clip_frac"] = row["clip_low"] + row["clip_high"]
        row["ratio_min"] = float(min(h["ratio_min"] for h in history))
        row["ratio_max"] = float(max(h["ratio_max"] for h in history))
        row["lr"] = history[-1]["lr"]
        train_tokens = sum(h["tokens"] for h in history)
        row["train_tok_s"] = train_tokens / max(row["train_s"], 1e-9)
        return row


def _merge_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Weighted means of the per-round score summaries (dynamic sampling scores in rounds)."""
    if len(summaries) == 1:
        return summaries[0]
    n = np.array([s["records"] for s in summaries], np.float64)
    w = n / n.sum()

    def avg(get: Callable[[dict[str, Any]], Any]) -> float | None:
        vals = [get(s) for s in summaries]
        if any(v is None for v in vals):
            return None
        return float(np.dot(w, vals))

    merged = dict(summaries[-1])
    merged["rewards_mean"] = {
        k: avg(lambda s, k=k: s["rewards_mean"][k]) for k in summaries[0]["rewards_mean"]
    }
    merged["reward"] = {"mean": avg(lambda s: s["reward"]["mean"]), "std": avg(lambda s: s["reward"]["std"])}
    merged["accuracy"] = avg(lambda s: s["accuracy"])
    merged["frac_reward_zero_std"] = float(
        sum(s["frac_reward_zero_std"] * s["groups"] for s in summaries) / sum(s["groups"] for s in summaries)
    )
    merged["truncation_rate"] = avg(lambda s: s["truncation_rate"])
    merged["completion_tokens"] = {"mean": avg(lambda s: s["completion_tokens"]["mean"])}
    merged["reward_errors"] = sum(s["reward_errors"] for s in summaries)
    merged["seconds"] = sum(s["seconds"] for s in summaries)
    return merged


def _summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {f"reward/{k}": v for k, v in summary["rewards_mean"].items()}
    row["reward"] = summary["reward"]["mean"]
    row["reward_std"] = summary["reward"]["std"]
    row["accuracy"] = summary["accuracy"]
    row["frac_reward_zero_std"] = summary["frac_reward_zero_std"]
    row["truncation_rate"] = summary["truncation_rate"]
    tokens = summary["completion_tokens"]
    row["completion_len"] = tokens["mean"]
    for key in ("mean_correct", "mean_incorrect"):
        if tokens.get(key) is not None:
            row[f"completion_len_{key.removeprefix('mean_')}"] = tokens[key]
    row["reward_errors"] = summary["reward_errors"]
    return row


def crash_point(name: str, step: int) -> None:
    """Fault injection for the kill tests: MLLMJAX_CRASH_AT=NAME@STEP kills this process with SIGKILL
    at that point (rollout, update, metrics, checkpoint: mid-write, before the rename)."""
    target = os.environ.get("MLLMJAX_CRASH_AT")
    if target and target == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
