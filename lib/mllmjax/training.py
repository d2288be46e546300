"""Training on scored rollout records: records -> batch, PPO epochs, a resumable checkpoint.

The one library function `mllmjax train` calls (`train_checkpoint`); the grpo loop uses the pieces
(`batch_from_records`, `save_train_state`, `restore_train_state`) in process.

Design decisions:
- Batch layout: prompts left-padded to a common width P and completions right-padded to C, so every
  completion starts at the static `completion_start = P` and the LM head only sees completion positions.
  P and C are rounded up to multiples of `LENGTH_BUCKET`, so a run compiles a bounded number of times.
- Records are checked against the checkpoint before any compute: token ids inside the vocabulary, and the
  first plain (not replayed) prompt re-encoded by the checkpoint's tokenizer must give its prompt_ids;
  otherwise the records came from another tokenizer and the message says so.
- The train state (optimizer state, update count, RNG) is saved beside the params as `opt_state/`, so
  `--resume` continues bit for bit. The KL reference is the policy the run started from: its path is
  kept in mllmjax.json as `reference` and reloaded on resume (only when beta > 0).
- A vision-language checkpoint (LLaVA, Gemma 3) trains on records with images (schema /2) and text records
  alike (`mllmjax.vision_training`: what trains, the pixels, the frozen tower); its output is the whole
  vision-language checkpoint with the processor's files, and mllmjax.json keeps the parts that trained
  (`trained`), which --resume must train again. A text checkpoint refuses records with images.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mllmjax import checksums, memory
from mllmjax.checkpoint import (
    Checkpoint,
    check_output,
    copy_side_files,
    expected_checksums,
    load_checkpoint,
    write_checkpoint,
)
from mllmjax.errors import ArtifactError, BadInputError
from mllmjax.memory import MemoryEstimate
from mllmjax.models.params import Params
from mllmjax.records import CONTINUATION_KEY, RolloutRecord, require_scored
from mllmjax.settings import Settings
from mllmjax.sharding import place_rows
from mllmjax.trainer import Batch, TrainConfig, Trainer, TrainState

LENGTH_BUCKET = 32


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def check_records(
    records: Sequence[RolloutRecord], tokenizer: Any, vocab_size: int, source: str, context: int | None = None
) -> None:
    """Fail early, with a clear message, on records the checkpoint cannot train on (ids outside the
    vocabulary, rows longer than the model's `context`, ...)."""
    if not records:
        raise BadInputError(f"{source}: no records to train on")
    require_scored(records, source=source)
    for i, r in enumerate(records, start=1):
        ids = r.prompt_ids + r.completion_ids
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise BadInputError(
                f"{source}:{i}: token id {max(ids)} is outside the checkpoint's vocabulary of {vocab_size}: "
                "the records come from a different tokenizer"
            )
        if context is not None and len(ids) > context:
            raise BadInputError(
                f"{source}:{i}: the record is {len(ids)} tokens; the model's context is {context} "
                "(the records were not sampled from this model)"
            )
        if not np.isfinite(r.advantage):
            raise BadInputError(f"{source}:{i}: advantage is {r.advantage}; re-score the rollouts")
    if not any(r.completion_ids for r in records):
        raise BadInputError(f"{source}: no completion tokens to train on")
    # A continuation record (grpo's replay buffer) holds its prompt followed by a partial completion's
    # tokens, whose decoded text need not re-encode to the same ids: the first plain record is checked.
    # A record with images holds its image slots in its text: the processor checks those
    # (`vision_training.record_pixels`).
    first = next((r for r in records if CONTINUATION_KEY not in r.meta and r.images is None), None)
    if first is not None and (
        list(tokenizer(first.prompt, add_special_tokens=False)["input_ids"]) != list(first.prompt_ids)
    ):
        raise BadInputError(
            f"{source}: prompt_ids do not match the checkpoint's tokenizer on the first record: "
            "the records come from a different tokenizer"
        )


def padded_shape(prompt_tokens: int, completion_tokens: int) -> tuple[int, int]:
    """The (prompt, completion) columns `batch_from_records` pads the longest prompt and completion to."""
    return _round_up(prompt_tokens, LENGTH_BUCKET), _round_up(completion_tokens, LENGTH_BUCKET)


def _longest(records: Sequence[RolloutRecord]) -> tuple[int, int]:
    return max(len(r.prompt_ids) for r in records), max(len(r.completion_ids) for r in records)


def batch_from_records(records: Sequence[RolloutRecord], *, pad_id: int = 0) -> Batch:
    """Left-pad prompts, right-pad completions; sampler log-probs ride along for truncated IS."""
    p, c = padded_shape(*_longest(records))
    b, t = len(records), p + c
    tokens = np.full((b, t), pad_id, np.int32)
    positions = np.zeros((b, t), np.int32)
    valid = np.zeros((b, t), bool)
    completion = np.zeros((b, t), bool)
    sampler = np.zeros((b, t), np.float32)
    for i, r in enumerate(records):
        n, m = len(r.prompt_ids), len(r.completion_ids)
        tokens[i, p - n : p] = r.prompt_ids
        tokens[i, p : p + m] = r.completion_ids
        positions[i, p - n : p + m] = np.arange(n + m)
        valid[i, p - n : p + m] = True
        completion[i, p : p + m] = True
        sampler[i, p : p + m] = r.logprobs
    advantages = np.asarray([r.advantage for r in records], np.float32)
    return Batch(
        tokens=jnp.asarray(tokens),
        positions=jnp.asarray(positions),
        valid=jnp.asarray(valid),
        completion=jnp.asarray(completion),
        advantages=jnp.asarray(advantages),
        sampler_logps=jnp.asarray(sampler),
        completion_start=p,
        prompt_rows=prompt_rows(prompt_keys(records)),
    )


def prompt_keys(records: Sequence[RolloutRecord]) -> list[tuple[Any, ...]]:
    """What makes two records' prompts the same: their prompt ids and their images' hashes (a visual
    task asks one question of many pictures, whose image tokens are the same ids)."""
    return [tuple(r.prompt_ids) + tuple(x["sha256"] for x in r.images or ()) for r in records]


def prompt_rows(prompts: Sequence[Sequence[int]]) -> int:
    """The largest k that divides the number of rows such that each run of k rows (from row 0) has one
    prompt: G for a file of whole groups in order (what rollout and grpo write), 1 when no two
    neighbouring rows share a prompt. The shared-prompt forward runs such a run's prompt once."""
    b = len(prompts)
    keys = [tuple(x) for x in prompts]
    for k in range(b, 1, -1):
        if b % k == 0 and all(keys[i] == keys[i - i % k] for i in range(b)):
            return k
    return 1


def place_batch(batch: Batch, mesh: Any) -> Batch:
    """Shard the batch's rows over the data-parallel mesh axes (replicated when they do not divide)."""
    return place_rows(batch, mesh)


def make_train_config(settings: Settings) -> TrainConfig:
    """The TrainConfig of `settings`; the LR schedule spans steps x ppo_epochs x minibatches updates."""
    from mllmjax.lora import from_settings as lora_from_settings
    from mllmjax.loss import LossConfig
    from mllmjax.optim import OptimConfig, total_updates

    s = settings
    return TrainConfig(
        loss=LossConfig(clip_low=s.clip_low, clip_high=s.clip_high, aggregation=s.loss_agg, beta=s.beta,
                        kl_estimator=s.kl, tis_cap=s.tis_cap, loss=s.loss, ratio_level=s.ratio_level,
                        entropy_coef=s.entropy_coef),
        optim=OptimConfig(name=s.optimizer, peak_lr=s.lr, warmup_frac=s.warmup, weight_decay=s.weight_decay,
                          total_updates=total_updates(s.steps, s.ppo_epochs, s.minibatches)),
        ppo_epochs=s.ppo_epochs, minibatches=s.minibatches, micro_batch=s.micro_batch, remat=s.remat,
        temperature=s.temperature, compute_dtype=s.compute_dtype, attention=s.attention,
        layer_loop=s.layer_loop, router_aux_coef=s.router_aux_coef, lora=lora_from_settings(s),
        shared_prompt=s.shared_prompt, train_vision=s.train_vision, train_projector=s.train_projector,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- state I/O
def state_extras(state: TrainState) -> dict[str, Any]:
    return {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def require_opt_state(ckpt: Checkpoint) -> None:
    if not ckpt.has_opt_state:
        raise ArtifactError(f"{ckpt.path} has no opt_state/ to resume from (only train/grpo outputs do)")


def restore_train_state(ckpt: Checkpoint, trainer: Trainer, params: Params | None = None) -> TrainState:
    """The TrainState saved with a checkpoint, placed like its params; params: the trained params when
    they are not all of the checkpoint's (a vision-language model's trained parts)."""
    import orbax.checkpoint as ocp

    require_opt_state(ckpt)
    params = ckpt.params if params is None else params
    template = jax.eval_shape(
        lambda p: state_extras(trainer.init_state(p, jax.random.key_data(jax.random.key(0)))), params
    )
    leaves, treedef = jax.tree.flatten(template)
    # Optimizer moments mirror the params: give each the sharding of the param with its shape.
    by_shape = {(x.shape, x.dtype): x.sharding for x in jax.tree.leaves(params)}
    some = jax.tree.leaves(params)[0].sharding
    if isinstance(some, jax.sharding.NamedSharding):  # step and rng: replicated over the params' mesh
        default: Any = jax.sharding.NamedSharding(some.mesh, jax.sharding.PartitionSpec())
    else:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_shape.get((x.shape, x.dtype), default))
        for x in leaves
    ]
    try:
        restored = ocp.StandardCheckpointer().restore(
            (ckpt.path / "opt_state").absolute(), jax.tree.unflatten(treedef, abstract)
        )
    except Exception as e:
        raise ArtifactError(
            f"{ckpt.path}/opt_state: cannot restore the optimizer state ({type(e).__name__}); "
            "was it written with another --optimizer?"
        ) from e
    checksums.verify_tree(restored, expected_checksums(ckpt.meta, "opt_state"), f"{ckpt.path}/opt_state")
    return TrainState(
        params=params, opt_state=restored["opt_state"], step=restored["step"], rng=restored["rng"]
    )


# ----------------------------------------------------------------------------------------- train
@dataclasses.dataclass(frozen=True)
class TrainResult:
    out: Path
    updates: int
    step: int
    history: list[dict[str, float]]


def train_checkpoint(
    ckpt_path: str | Path,
    records: Sequence[RolloutRecord],
    out: str | Path,
    cfg: TrainConfig,
    *,
    mesh: Mesh,
    seed: int,
    source: str = "records",
    resume: bool = False,
    force: bool = False,
    on_update: Callable[[dict[str, float]], None] | None = None,
    on_memory: Callable[[MemoryEstimate], None] | None = None,
) -> TrainResult:
    """PPO epochs on scored records from CKPT on `mesh`; write a new checkpoint (with opt_state) at OUT.

    Before the parameters are loaded, the memory one update needs is estimated (`mllmjax.memory`),
    passed to on_memory, and a run that cannot fit stops with BadInputError."""
    from mllmjax.models.registry import is_vision_language
    from mllmjax.records import refuse_images, verify_images

    ckpt_path, out = Path(ckpt_path), Path(out)
    check_output(out, force)
    head = load_checkpoint(ckpt_path, load_params=False, vision_language=True)
    vision = is_vision_language(str(head.meta.get("family", "")))
    if not vision:
        refuse_images(records, source=source, model=ckpt_path)
    text_cfg = head.cfg.text if vision else head.cfg
    check_records(records, head.tokenizer(), text_cfg.vocab_size, source, text_cfg.max_position_embeddings)
    if resume:
        require_opt_state(head)
    if vision:
        from mllmjax.vision_training import check_image_tokens, check_lora, trained_parts

        check_lora(cfg, ckpt_path)
        parts = list(trained_parts(cfg))
        if resume and head.meta.get("trained", parts) != parts:
            raise BadInputError(
                f"{ckpt_path} trained the {', '.join(head.meta['trained'])}; --resume trains the same parts "
                "(give --train-vision and --train-projector as that run had them)"
            )
        verify_images(records, source=source)
        check_image_tokens(records, head.cfg, source=source)
    if cfg.lora.enabled:
        check_lora_start(head, cfg.lora)
    widths = padded_shape(*_longest(records))
    dtype = head.meta.get("dtype", "float32")
    estimate = memory.for_train_config(
        text_cfg, cfg, rows=len(records) // cfg.minibatches, seq_len=sum(widths), completion_len=widths[1],
        param_dtype=dtype, mesh=mesh, donated=True, prompt_rows=prompt_rows(prompt_keys(records)),
    )  # fmt: skip
    if vision:  # its language model's estimate, plus the tower and projector
        _, extra = memory.vision_language_bytes(
            head.cfg, trained_parts(cfg), param_dtype=dtype, optimizer=cfg.optim.name, beta=cfg.loss.beta,
            mesh=mesh, donated=True,
        )  # fmt: skip
        estimate = memory.MemoryEstimate({**estimate.parts, "tower+projector": extra}, estimate.available)
    estimate = memory.with_process(estimate)  # on the CPU, plus what the process holds already
    if on_memory is not None:
        on_memory(estimate)
    estimate.check(memory.TRAIN_HINT)
    if vision:
        return _train_vision(
            ckpt_path, head, records, out, cfg, mesh=mesh, seed=seed, resume=resume, force=force,
            on_update=on_update, source=source,
        )  # fmt: skip
    if cfg.lora.enabled:
        return _train_lora(
            ckpt_path, head, records, out, cfg, mesh=mesh, seed=seed, resume=resume, force=force,
            on_update=on_update,
        )  # fmt: skip
    if head.lora is not None and resume:
        raise BadInputError(
            f"{ckpt_path} is a LoRA checkpoint; pass its --lora-rank {head.lora.rank} to resume it"
        )
    ckpt = load_checkpoint(ckpt_path, mesh=mesh)
    reference = ckpt.meta.get("reference", str(ckpt_path)) if resume else str(ckpt_path)
    ref_params = None
    if cfg.loss.beta > 0:
        if reference == str(ckpt_path):
            # A copy: the trainer donates the state, whose params start as these very buffers.
            ref_params = jax.tree.map(jnp.copy, ckpt.params)
        else:
            if not Path(reference).is_dir():
                raise ArtifactError(f"the KL reference {reference} (from {ckpt_path}/mllmjax.json) is gone")
            ref_params = load_checkpoint(reference, mesh=mesh).params
    trainer = Trainer(ckpt.cfg, cfg, ref_params=ref_params, donate=True, mesh=mesh)
    if resume:
        state = restore_train_state(ckpt, trainer)
    else:
        state = trainer.init_state(ckpt.params, jax.random.key_data(jax.random.key(seed)))
    return _train_and_write(
        trainer, state, records, ckpt, ckpt_path, out, mesh=mesh, force=force, on_update=on_update,
        meta={"reference": reference},
    )  # fmt: skip


def _train_and_write(
    trainer: Trainer,
    state: TrainState,
    records: Sequence[RolloutRecord],
    head: Checkpoint,
    ckpt_path: Path,
    out: Path,
    *,
    mesh: Mesh,
    force: bool,
    on_update: Callable[[dict[str, float]], None] | None,
    meta: dict[str, Any],
    pixels: np.ndarray | None = None,
    saved_params: Callable[[Params], Params] | None = None,
) -> TrainResult:
    """`train`'s PPO epochs on the records from `state`, then the new checkpoint at `out`: its params
    (the model's, or a LoRA run's adapters) and optimizer state, the side files of `ckpt_path`, the
    update metrics (train_metrics.jsonl), one step past `head`'s; meta: what mllmjax.json adds.
    pixels: the rows' images (`Batch.pixels`); saved_params: the params to write of the state's
    (default the state's own)."""
    batch = batch_from_records(records)
    if pixels is not None:
        batch = batch.replace(pixels=jnp.asarray(pixels))
    batch = place_batch(batch, mesh)
    state, history = trainer.train_on_batch(state, batch, on_update=on_update)
    step = int(head.meta.get("step", 0)) + 1
    metrics = "".join(json.dumps(m) + "\n" for m in history)

    def write_extras(d: Path) -> None:
        copy_side_files(ckpt_path, d)
        (d / "train_metrics.jsonl").write_text(metrics)

    write_checkpoint(
        out,
        params=state.params if saved_params is None else saved_params(state.params),
        hf_config=head.hf_config,
        write_tokenizer=write_extras,
        source=head.meta.get("source", str(ckpt_path)),
        step=step,
        parent=str(ckpt_path),
        force=force,
        opt_state=state_extras(state),
        extra_meta={**meta, "updates": int(state.step)},
    )
    return TrainResult(out, len(history), step, history)


def check_lora_start(head: Checkpoint, lcfg: Any) -> None:
    """Refuse, before any work, LoRA targets the model lacks, or a LoRA checkpoint whose adapters have
    another shape than `lcfg` asks for."""
    from mllmjax import lora

    model_cfg = getattr(head.cfg, "text", head.cfg)  # a vision-language model's: its language model's
    lora.resolved_targets(model_cfg, lcfg)
    if head.lora is not None and not lora.same_adapters(head.lora, lcfg, model_cfg):
        raise BadInputError(
            f"{head.path} holds rank-{head.lora.rank} adapters (alpha {head.lora.alpha:g}, targets "
            f"{','.join(lora.resolved_targets(model_cfg, head.lora))}); train them on with the same "
            "--lora-rank, --lora-alpha and --lora-targets"
        )


def lora_start(
    ckpt_path: Path, lcfg: Any, *, mesh: Mesh, dtype: Any = None, vision_language: bool = False
) -> tuple[Checkpoint, Params | None, dict[str, Any]]:
    """Where LoRA training starts from CKPT: (the base checkpoint, loaded; the adapters to continue,
    or None for fresh ones; the "lora" entry the outputs record). CKPT is a base model, or a LoRA
    checkpoint whose adapters have the shape of `lcfg` (rank, alpha, targets). vision_language: CKPT
    may be a vision-language model (the adapters are its language model's)."""
    from mllmjax import lora

    vl = dict(vision_language=vision_language)
    head = load_checkpoint(ckpt_path, load_params=False, **vl)
    check_lora_start(head, lcfg)
    if head.lora is None:
        base = load_checkpoint(ckpt_path, mesh=mesh, dtype=dtype, **vl)
        entry = lora.meta_entry(
            lcfg, getattr(base.cfg, "text", base.cfg), str(ckpt_path.absolute()),
            lora.content_hash(base.meta, base.params),
        )  # fmt: skip
        return base, None, entry
    ckpt = load_checkpoint(ckpt_path, mesh=mesh, dtype=dtype, adapters=True, **vl)
    assert ckpt.base is not None
    entry = {**head.meta["lora"], "dropout": lcfg.dropout}
    return ckpt.base, ckpt.params, entry


def _train_lora(
    ckpt_path: Path,
    head: Checkpoint,
    records: Sequence[RolloutRecord],
    out: Path,
    cfg: TrainConfig,
    *,
    mesh: Mesh,
    seed: int,
    resume: bool,
    force: bool,
    on_update: Callable[[dict[str, float]], None] | None,
    vision: bool = False,
    pixels: np.ndarray | None = None,
) -> TrainResult:
    """`train_checkpoint` with LoRA: adapters trained on the frozen base, which is the KL reference;
    OUT holds the adapters (+ optimizer state) and names the base. vision: a vision-language base,
    whose language model carries the adapters (tower and projector frozen with it); pixels: the rows'
    images."""
    from mllmjax import lora
    from mllmjax.sharding import spec_shardings

    if resume and head.lora is None:
        raise BadInputError(f"{ckpt_path} is not a LoRA checkpoint; --resume with --lora-rank needs one")
    base, adapters, entry = lora_start(ckpt_path, cfg.lora, mesh=mesh, vision_language=vision)
    if vision:
        from mllmjax.vision_training import VisionTrainer

        trainer: Trainer = VisionTrainer(base.cfg, cfg, frozen=base.params, donate=True, mesh=mesh)
    else:
        trainer = Trainer(base.cfg, cfg, base=base.params, donate=True, mesh=mesh)
    if adapters is None:
        model_cfg = getattr(base.cfg, "text", base.cfg)
        shardings = spec_shardings(lora.adapter_specs(model_cfg, cfg.lora), mesh)
        adapters = lora.init_adapters(
            model_cfg, cfg.lora, jax.random.fold_in(jax.random.key(seed), 7), shardings
        )
    if resume:
        ckpt = load_checkpoint(ckpt_path, mesh=mesh, adapters=True, base=base, vision_language=vision)
        state = restore_train_state(ckpt, trainer)
    else:
        state = trainer.init_state(adapters, jax.random.key_data(jax.random.key(seed)))
    return _train_and_write(
        trainer, state, records, head, ckpt_path, out, mesh=mesh, force=force, on_update=on_update,
        meta={"reference": entry["base"], "lora": entry}, pixels=pixels,
    )  # fmt: skip


def _train_vision(
    ckpt_path: Path,
    head: Checkpoint,
    records: Sequence[RolloutRecord],
    out: Path,
    cfg: TrainConfig,
    *,
    mesh: Mesh,
    seed: int,
    resume: bool,
    force: bool,
    on_update: Callable[[dict[str, float]], None] | None,
    source: str,
) -> TrainResult:
    """`train_checkpoint` on a vision-language checkpoint: the records' pixels from its
    processor, the trained parts (`vision_training.trained_parts`) as the state's params, the frozen
    ones beside them; OUT is the whole vision-language checkpoint."""
    from mllmjax import images as im
    from mllmjax.vision_training import VisionTrainer, record_pixels, split_trainable, trained_parts

    parts = trained_parts(cfg)
    pixels = record_pixels(records, im.load_processor(ckpt_path), head.cfg, source=source)
    if cfg.lora.enabled:  # adapters on its language model
        return _train_lora(
            ckpt_path, head, records, out, cfg, mesh=mesh, seed=seed, resume=resume, force=force,
            on_update=on_update, vision=True, pixels=pixels,
        )  # fmt: skip
    ckpt = load_checkpoint(ckpt_path, mesh=mesh, vision_language=True)
    trained, frozen = split_trainable(ckpt.params, parts)
    reference = ckpt.meta.get("reference", str(ckpt_path)) if resume else str(ckpt_path)
    ref_params = None
    if cfg.loss.beta > 0:
        if reference == str(ckpt_path):
            # A copy of what trains: the trainer donates the state, whose params start as these buffers.
            ref_params = {**frozen, **jax.tree.map(jnp.copy, trained)}
        else:
            if not Path(reference).is_dir():
                raise ArtifactError(f"the KL reference {reference} (from {ckpt_path}/mllmjax.json) is gone")
            ref_params = load_checkpoint(reference, mesh=mesh, vision_language=True).params
    trainer = VisionTrainer(ckpt.cfg, cfg, frozen=frozen, ref_params=ref_params, donate=True, mesh=mesh)
    if resume:
        state = restore_train_state(ckpt, trainer, params=trained)
    else:
        state = trainer.init_state(trained, jax.random.key_data(jax.random.key(seed)))
    return _train_and_write(
        trainer, state, records, ckpt, ckpt_path, out, mesh=mesh, force=force, on_update=on_update,
        meta={"reference": reference, "trained": list(parts)}, pixels=pixels,
        saved_params=trainer.full_params,
    )  # fmt: skip
