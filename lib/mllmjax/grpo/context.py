"""Opening a run: everything a run holds fixed (`RunContext`, built once) and the small state that
changes step by step (`RunState`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mllmjax.convert import resolve_model
from mllmjax.errors import ArtifactError, BadInputError, OutputExistsError
from mllmjax.grpo.config import GRPOConfig
from mllmjax.grpo.replay import ReplayBuffer
from mllmjax.grpo.report import Hook, check_reporters, reporting_hooks
from mllmjax.grpo.run_dir import CONFIG_FILE, RunDir, read_run_config
from mllmjax.grpo.stages import train_rng

Emit = Callable[[str, dict[str, Any]], None]


@dataclasses.dataclass(frozen=True, eq=False)
class RunContext:
    """What a run holds fixed from its first step to its last."""

    cfg: GRPOConfig
    run_dir: RunDir
    start_checkpoint: Path  # the model the run started from (and the KL reference)
    mesh: Any  # jax.sharding.Mesh of training
    sample_mesh: Any  # the Mesh rollouts and evaluation decode on (`mesh` unless --sample-mesh)
    model_cfg: Any
    hf_config: dict[str, Any]
    tokenizer: Any
    stop_ids: tuple[int, ...]
    pad_id: int
    problems: Sequence[Any]
    eval_problems: Sequence[Any]
    trainer: Any
    primary: bool  # the process that writes the run directory
    hooks: tuple[Hook, ...]
    # LoRA: the "lora" entry of the run's checkpoints (config, base path and hash); None without LoRA.
    lora_entry: dict[str, Any] | None = None
    # A vision-language model (LLaVA, Gemma 3): its HF processor, which builds every prompt with its images
    # (`grpo.vision`); None for a text model.
    processor: Any = None

    @property
    def vision(self) -> bool:
        """Whether the run trains a vision-language model (its prompts may hold images)."""
        return self.processor is not None

    @property
    def reference(self) -> str:
        """The KL reference the checkpoints record: the start checkpoint, or with LoRA the base."""
        return self.lora_entry["base"] if self.lora_entry is not None else str(self.start_checkpoint)

    def policy(self, params: Any) -> Any:
        """The params rollouts and evaluation decode with: the train state's params, or with LoRA the
        base with the adapters attached (no copy: the decode step runs the low-rank path, and the CPU
        decode loop merges them into the transposed copy it makes anyway). Where the decode mesh
        differs from training's (--sample-mesh, several hosts) the weights are copied anyway, and a
        merged copy is made instead."""
        import jax

        from mllmjax.lora import attach, merged_if_adapted

        if self.vision and self.trainer.lora is None:  # the trained parts with the frozen ones
            return self.trainer.full_params(params)
        if self.trainer.lora is None:
            return params
        base = self.trainer.base["text"] if self.vision else self.trainer.base
        attached = attach(base, params, self.trainer.lora, getattr(self.model_cfg, "text", self.model_cfg))
        if self.sample_mesh is not self.mesh or jax.process_count() > 1:
            attached = merged_if_adapted(attached)
        # a vision-language model's adapters are its language model's
        return {**self.trainer.base, "text": attached} if self.vision else attached

    def image_token_ids(self) -> frozenset[int]:
        """The ids of a vision-language model's image tokens (its image token and the slot the
        processor expands, Gemma 3's <start_of_image>); none on a text run. The replay buffer does not
        continue a completion that holds one: a prompt holds exactly the image tokens its images fill."""
        if not self.vision:
            return frozenset()
        from mllmjax.images import slot_token

        slot = self.processor.tokenizer.convert_tokens_to_ids(slot_token(self.processor))
        return frozenset(x for x in (self.model_cfg.image_token_id, slot) if isinstance(x, int) and x >= 0)

    def rollouts(
        self, params: Any, problems: Sequence[Any], rcfg: Any, *, policy: str, **kwargs: Any
    ) -> list[Any]:
        """This process's share of the rollouts of `problems` under the decode params `params`
        (`policy`'s): `rollout.host_rollouts`, or on a vision-language model `grpo.vision.rollouts`.
        kwargs: first_group, meta, on_batch."""
        if self.vision:
            from mllmjax.grpo.vision import rollouts

            return rollouts(self, params, problems, rcfg, policy=policy, **kwargs)
        from mllmjax.rollout import host_rollouts

        return host_rollouts(
            params, self.model_cfg, self.tokenizer, problems, rcfg, stop_ids=self.stop_ids, policy=policy,
            mesh=self.sample_mesh, compute_dtype=self.cfg.compute_dtype, **kwargs,
        )  # fmt: skip


@dataclasses.dataclass
class RunState:
    """What a step changes: the train state (params, optimizer, update count, RNG), the last finished
    step, the cursor into the data order, the metrics rows so far (the estimator switch reads the last
    entropy there), the last checkpointed step and the replay buffer (`grpo.replay`)."""

    train: Any
    step: int = 0
    cursor: int = 0
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    saved_step: int = -1
    replay: ReplayBuffer | None = None


def check_run_dir(path: Path, *, resume: bool, force: bool) -> None:
    """Refuse to overwrite a run without --force, or to resume a directory that is not a run."""
    if not resume and path.exists() and any(path.iterdir()) and not force:
        raise OutputExistsError(
            f"{path} exists; pass --resume {path} to continue it or --force to replace it"
        )
    if resume and not (path / CONFIG_FILE).is_file():
        raise ArtifactError(f"{path} is not a grpo run directory (no {CONFIG_FILE})")


def open_run(
    cfg: GRPOConfig, path: Path, *, resume: bool, force: bool, hooks: Sequence[Hook], emit: Emit
) -> tuple[RunContext, RunState]:
    """Load everything a run needs, in the order that fails cheapest first (reporters, data, memory),
    and write nothing before all of it is known to work; then create or resume the run directory."""
    import jax

    from mllmjax.checkpoint import load_checkpoint, resolve_dtype, stop_ids_for
    from mllmjax.distributed import barrier, is_primary
    from mllmjax.trainer import Trainer

    check_reporters(cfg.report_to)
    # Multi-host: every process runs the loop; each samples and scores its share of the prompts,
    # the scored records are gathered, and process 0 writes the run's files.
    run_dir = RunDir(path, primary=is_primary())
    start_checkpoint = _start_checkpoint(cfg, run_dir, resume=resume, force=force, emit=emit)
    tcfg = cfg.train_config()
    vision = is_vision_checkpoint(start_checkpoint)
    if vision:
        from mllmjax.grpo.vision import check_vision_run

        check_vision_run(tcfg, start_checkpoint)
    mesh, sample_mesh = _meshes(cfg)
    # A bad --data fails before the model is loaded; a visual task's pictures are drawn into RUN/images
    # as its steps use them (`grpo.vision.rollouts`).
    problems, eval_problems = _problems(cfg, pictures=run_dir.path / "images" if vision else None)
    lora_entry = processor = None
    if vision:
        from mllmjax.images import load_processor

        processor = load_processor(start_checkpoint)
    if vision and not tcfg.lora.enabled:
        start = load_checkpoint(start_checkpoint, mesh=mesh, dtype=resolve_dtype(cfg.dtype), vision_language=True)
    elif tcfg.lora.enabled:  # start: the base model; the adapters are fresh or the start checkpoint's
        from mllmjax.training import lora_start

        start, adapters, lora_entry = lora_start(
            start_checkpoint, tcfg.lora, mesh=mesh, dtype=resolve_dtype(cfg.dtype), vision_language=vision
        )
    else:
        start = load_checkpoint(start_checkpoint, mesh=mesh, dtype=resolve_dtype(cfg.dtype))
    tokenizer = processor.tokenizer if vision else start.tokenizer()
    # A vision-language checkpoint's stop ids are completed from its processor's tokenizer, as sample's.
    stop_ids = tuple(stop_ids_for(tokenizer, start.stop_ids)) if vision else start.stop_ids
    check_memory(cfg, start, tcfg, tokenizer, problems, mesh, sample_mesh, emit, processor)
    if vision and tcfg.lora.enabled:  # adapters on the language model; the whole model is the base
        from mllmjax.vision_training import VisionTrainer

        trainer = VisionTrainer(start.cfg, tcfg, frozen=start.params, donate=True, mesh=mesh)
        initial = adapters if adapters is not None else _fresh_adapters(cfg, start.cfg.text, tcfg, mesh)
    elif vision:
        from mllmjax.vision_training import VisionTrainer, split_trainable, trained_parts

        # The first state's params are the trained parts of the reference's buffers: the loop never
        # donates the state a run starts from.
        initial, frozen = split_trainable(start.params, trained_parts(tcfg))
        ref = start.params if cfg.beta > 0 else None
        trainer = VisionTrainer(start.cfg, tcfg, frozen=frozen, ref_params=ref, donate=True, mesh=mesh)
    elif tcfg.lora.enabled:
        trainer = Trainer(start.cfg, tcfg, base=start.params, donate=True, mesh=mesh)
        initial = adapters if adapters is not None else _fresh_adapters(cfg, start.cfg, tcfg, mesh)
    else:
        trainer = Trainer(
            start.cfg, tcfg, ref_params=start.params if cfg.beta > 0 else None, donate=True, mesh=mesh
        )
        initial = start.params
    if resume:
        state = _resumed_state(
            cfg, run_dir, trainer, initial, mesh, base=start if lora_entry else None, vision=vision
        )
    else:
        run_dir.create({**cfg.to_dict(), "start_checkpoint": str(start_checkpoint),
                        "model_config": start.cfg.family, "devices": jax.device_count(),
                        "processes": jax.process_count()})  # fmt: skip
        state = RunState(train=trainer.init_state(initial, train_rng(cfg.seed)))
        state.replay = ReplayBuffer(cfg.replay_size)
    barrier("grpo:setup")
    ctx = RunContext(
        cfg=cfg, run_dir=run_dir, start_checkpoint=start_checkpoint, mesh=mesh, sample_mesh=sample_mesh,
        model_cfg=start.cfg, hf_config=start.hf_config, tokenizer=tokenizer, stop_ids=stop_ids,
        pad_id=tokenizer.pad_token_id or 0, problems=problems, eval_problems=eval_problems, trainer=trainer,
        primary=run_dir.primary,
        hooks=(*hooks, *(reporting_hooks(cfg, path, run_dir.plots) if run_dir.primary else ())),
        lora_entry=lora_entry, processor=processor,
    )  # fmt: skip
    return ctx, state


def is_vision_checkpoint(path: Path) -> bool:
    """Whether the checkpoint at path is a vision-language one (its family is registered as such)."""
    from mllmjax.checkpoint import read_meta
    from mllmjax.models.registry import is_vision_language

    return is_vision_language(str(read_meta(path, vision_language=True).get("family", "")))


def _fresh_adapters(cfg: GRPOConfig, model_cfg: Any, tcfg: Any, mesh: Any) -> Any:
    """New LoRA adapters (b = 0: the run starts at the base's policy), placed on the training mesh."""
    import jax

    from mllmjax.grpo.stages import derived_seed
    from mllmjax.lora import adapter_specs, init_adapters
    from mllmjax.sharding import spec_shardings

    shardings = spec_shardings(adapter_specs(model_cfg, tcfg.lora), mesh)
    return init_adapters(model_cfg, tcfg.lora, jax.random.key(derived_seed(cfg.seed, 6)), shardings)


def _start_checkpoint(cfg: GRPOConfig, run_dir: RunDir, *, resume: bool, force: bool, emit: Emit) -> Path:
    """The checkpoint the run starts from: the saved one on resume, else --model (converted on first use)."""
    import jax

    from mllmjax.checkpoint import META_FILE
    from mllmjax.distributed import barrier

    if resume:
        return Path(read_run_config(run_dir.path)["start_checkpoint"])
    if force:
        run_dir.remove()
    barrier("grpo:fresh-run-dir")
    if jax.process_count() > 1 and not (Path(cfg.model) / META_FILE).is_file():
        raise BadInputError(
            f"a multi-host run needs --model to be a converted checkpoint on storage every host "
            f"sees; run `mllmjax convert {cfg.model} -o DIR` once and pass --model DIR"
        )
    emit("phase", {"phase": "model"})
    return resolve_model(cfg.model, dtype=cfg.dtype, on_convert=lambda out: emit("convert", {"out": out}))


def _meshes(cfg: GRPOConfig) -> tuple[Any, Any]:
    """--mesh and --sample-mesh parsed, once, into the training and the decoding Mesh."""
    import jax

    from mllmjax.distributed import decode_mesh
    from mllmjax.sharding import make_mesh

    mesh = make_mesh(cfg.mesh)
    if jax.process_count() > 1:  # each host decodes its share of the prompts on its own devices
        flag = "--sample-mesh" if cfg.sample_mesh else "--mesh"
        return mesh, decode_mesh(cfg.sample_mesh or cfg.mesh, flag)
    return mesh, make_mesh(cfg.sample_mesh) if cfg.sample_mesh else mesh


def _problems(cfg: GRPOConfig, pictures: Path | None = None) -> tuple[list[Any], list[Any]]:
    """The training problems and the held-out ones (none with --eval-every 0). pictures: on a
    vision-language model, the folder a visual task's pictures go to (named, drawn when used) and the
    images records hold themselves, and the records' --image-field is read; None: a text model, which
    refuses records with images (BadInputError)."""
    from mllmjax.data import load_problems

    fields: dict[str, Any] = {"question_field": cfg.question_field, "answer_field": cfg.answer_field}
    if pictures is not None:
        fields.update(image_field=cfg.image_field, image_dir=pictures.absolute(), draw=False)
    problems = load_problems(cfg.data, split=cfg.split, **fields)
    held_out = []
    if cfg.eval_every:
        held_out = load_problems(
            cfg.eval_data or cfg.data, split=cfg.eval_split, num=cfg.eval_num_prompts, **fields
        )
    if pictures is None:  # a text model: records with images are refused, as rollout refuses them
        with_images = next((p for p in [*problems, *held_out] if p.meta.get(cfg.image_field)), None)
        if with_images is not None:
            raise BadInputError(
                f"{cfg.model} is a text model; problem {with_images.id} has images (--image-field "
                f"{cfg.image_field}), which need a vision-language checkpoint"
            )
    return problems, held_out


def _resumed_state(
    cfg: GRPOConfig, run_dir: RunDir, trainer: Any, start_params: Any, mesh: Any, base: Any = None,
    vision: bool = False,
) -> RunState:  # fmt: skip
    """The state of the last whole checkpoint, and metrics.jsonl cut back to its step. base: with
    LoRA, the base checkpoint already loaded (the saved checkpoints hold adapters on it). vision: a
    vision-language run, whose checkpoints hold the whole model and whose state the trained parts
    (with LoRA: the adapters, as a text run's)."""
    from mllmjax.checkpoint import load_checkpoint, resolve_dtype
    from mllmjax.training import restore_train_state

    steps = run_dir.checkpoint_steps()
    run_dir.clean_partial()
    if steps:
        ckpt = load_checkpoint(
            run_dir.checkpoint(steps[-1]), mesh=mesh, dtype=resolve_dtype(cfg.dtype),
            adapters=base is not None, base=base, vision_language=vision,
        )  # fmt: skip
        grpo_meta = ckpt.meta.get("grpo", {})
        step = int(grpo_meta.get("step", steps[-1]))
        whole = vision and base is None  # a vision-language run's checkpoint holds the whole model
        trained = {k: v for k, v in ckpt.params.items() if k in trainer.parts} if whole else None
        state = RunState(
            restore_train_state(ckpt, trainer, params=trained), step=step, cursor=int(grpo_meta["cursor"])
        )
        state.replay = ReplayBuffer.from_json(cfg.replay_size, grpo_meta.get("replay"))
    else:  # killed before the first checkpoint: start over in the same directory
        state = RunState(trainer.init_state(start_params, train_rng(cfg.seed)))
        state.replay = ReplayBuffer(cfg.replay_size)
    state.metrics = run_dir.read_metrics(upto=state.step)
    state.saved_step = state.step
    run_dir.rewrite_metrics(state.metrics)
    return state


def check_memory(
    cfg: GRPOConfig, start: Any, tcfg: Any, tokenizer: Any, problems: Sequence[Any], mesh: Any,
    sample_mesh: Any, emit: Emit, processor: Any = None,
) -> None:  # fmt: skip
    """Estimate the memory of a rollout and of one update (prompt length from the first 256
    problems), report both as 'memory' events, and stop before the optimizer state exists if
    either cannot fit. processor: a vision-language model's, which makes its prompts."""
    import jax

    from mllmjax import memory
    from mllmjax.rollout import encode_prompt

    rcfg = cfg.rollout_config(seed=0)
    if processor is not None:  # its prompts as the processor makes them, each image's tokens expanded
        from mllmjax.rollout import vision_prompt_length

        per_image = start.cfg.tokens_per_image
        longest = max(vision_prompt_length(processor, p, rcfg, per_image) for p in problems[:256])
    else:
        longest = max(len(encode_prompt(tokenizer, p, rcfg)[1]) for p in problems[:256])
    dtype = jax.tree.leaves(start.params)[0].dtype.name  # with LoRA, the base's
    rollout, update = run_estimates(cfg, start.cfg, tcfg, longest, dtype, mesh, sample_mesh)
    # On the CPU, plus what the process holds besides the loaded parameters.
    rollout, update = (memory.with_process(e, start.params) for e in (rollout, update))
    for name, estimate in (("rollout", rollout), ("update", update)):
        emit("memory", {"line": estimate.describe(name), "bytes": estimate.total})
    rollout.check("use a smaller --batch-size or --max-new-tokens, or more devices in --sample-mesh")
    update.check(memory.TRAIN_HINT)


def run_estimates(
    cfg: GRPOConfig,
    model_cfg: Any,
    tcfg: Any,
    longest: int,
    param_dtype: str,
    mesh: Any,
    sample_mesh: Any,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """Per-device (rollout, update) `memory.MemoryEstimate`s of a run whose longest prompt has `longest`
    tokens, from shapes alone (no process memory): `check_memory`'s, and scripts/vlm_memory_plan.py's for
    a model not at hand. A vision-language model: its language model's estimate plus the tower and
    projector ("tower+projector", `memory.vision_language_bytes`). backend: where the run would be
    ("cpu", "gpu", "tpu"; default this process's), which decides the CPU-only parts."""
    import jax

    from mllmjax import memory
    from mllmjax.grpo.stages import reuses_state_buffers
    from mllmjax.sampling.buckets import MIN_NEW_BUCKET, bucket, decode_windows, prompt_bucket
    from mllmjax.training import padded_shape

    text_cfg = getattr(model_cfg, "text", model_cfg)
    on_cpu = (backend or jax.default_backend()) == "cpu"
    if cfg.replay_prob > 0:  # a continuation prompt holds up to max_new_tokens - 1 completion tokens more
        longest += cfg.max_new_tokens - 1
    # Not donated: the updates take over a copy, and the state the step started from stays alive
    # beside it (to roll the step back), which is the "new state" of a non-donated update.
    widths = padded_shape(longest, cfg.max_new_tokens)
    update = memory.for_train_config(
        text_cfg, tcfg, rows=cfg.prompts_per_step * cfg.group_size // cfg.minibatches,
        seq_len=sum(widths), completion_len=widths[1], param_dtype=param_dtype, mesh=mesh,
        prompt_rows=cfg.group_size,
    )  # fmt: skip
    # A rollout decodes up to batch-size rows (whole groups) while the train state, the KL reference
    # and, with --sample-mesh, a resharded copy of the parameters are alive.
    # Multi-host: a host decodes its share of the prompts. Dynamic sampling's rounds fill the batch.
    groups = cfg.round_groups(cfg.prompts_per_step, cfg.group_size)
    share = -(-groups // jax.process_count())
    prompts = bucket(min(max(1, cfg.batch_size // cfg.group_size), share))
    decode = memory.estimate_sampling(
        text_cfg, rows=prompts * cfg.group_size, param_dtype=param_dtype, compute_dtype=cfg.compute_dtype,
        cache_len=decode_windows(prompt_bucket(longest), bucket(cfg.max_new_tokens, MIN_NEW_BUCKET)),
        mesh=sample_mesh, out_major=on_cpu,  # the CPU decode loop's output-major copy (`unrolled`)
    )  # fmt: skip
    rollout = memory.MemoryEstimate(
        {
            "params": update.parts["params"],
            "adapters": update.parts.get("adapters", 0),
            "optimizer": update.parts["optimizer"],
            "reference": update.parts["reference"],
            "sampling copy": decode.parts["params"] if sample_mesh is not mesh else 0,
            "decode_weights": decode.parts.get("decode_weights", 0),
            "kv_cache": decode.parts["kv_cache"],
            "logits": decode.parts["logits"],
            # On the kept CPU heap the state the last step started from waits for the next step's copy.
            "spare state": update.parts["new state"] if on_cpu and reuses_state_buffers() else 0,
        },
        update.available,
    )
    if text_cfg is not model_cfg:
        from mllmjax.vision_training import trained_parts

        during = memory.vision_language_bytes(
            model_cfg, trained_parts(tcfg), param_dtype=param_dtype, optimizer=tcfg.optim.name,
            beta=tcfg.loss.beta, mesh=mesh,
        )  # fmt: skip
        rollout, update = (
            memory.MemoryEstimate({**e.parts, "tower+projector": n}, e.available)
            for e, n in zip((rollout, update), during, strict=True)
        )
    return rollout, update
