"""The checkpoint artifact (format `mllmjax.checkpoint/1`).

    CKPT/mllmjax.json    {"format", family, dtype, source, step, parent, created}
    CKPT/config.json     the HF model config, as the source had it
    CKPT/tokenizer*      tokenizer + chat template; generation_config.json holds the stop ids
    CKPT/params/         Orbax param tree, saved from sharded arrays, restorable onto any mesh
    CKPT/opt_state/      optimizer state + step + rng (train/grpo outputs only)

A vision-language checkpoint (family "llava" or "gemma3_vision": params {"vision", "projector", "text"}, the HF processor's
files beside the tokenizer's) is read only by the commands that ask for one (convert and train write
it, export, sample, rollout and train read it: `vision_language=True`); every other command (eval,
grpo) is refused in `read_meta`, which each of them goes through before anything else
(`refuse_vision_language`).

A LoRA checkpoint (train/grpo with --lora-rank) holds the adapters in params/ (a vision-language
model's: its language model's adapters) and, in mllmjax.json,
"lora": {rank, alpha, dropout, targets, base, base_hash} (`mllmjax.lora`). Loading one loads its base
(refusing a base whose content hash differs) and gives the merged weights, or with adapters=True the
adapters with the base beside them, for training on.

Writes are atomic: everything goes into a hidden sibling directory that is renamed onto CKPT only
when complete, so a crash or a failed write never leaves something a later command would read as a
whole checkpoint, and an existing CKPT (with --force) is replaced only at that last step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllmjax import checksums
from mllmjax.cleanup import check_output
from mllmjax.errors import ArtifactError, BadInputError
from mllmjax.faults import signal_point
from mllmjax.models.config import ModelConfig
from mllmjax.models.params import Params, map_specs
from mllmjax.models.registry import from_hf_config, is_vision_language, model_config_from_hf
from mllmjax.sharding import param_shardings

FORMAT = "mllmjax.checkpoint/1"
META_FILE = "mllmjax.json"
# Tokens that end an assistant turn in the chat templates of the supported families.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str | None) -> Any:
    """'auto' -> float32 on CPU, bfloat16 on accelerators; else one of DTYPES."""
    if name in (None, "auto"):
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in DTYPES:
        raise BadInputError(f"unknown dtype {name!r}; expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


@dataclasses.dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    hf_config: dict[str, Any]
    cfg: ModelConfig  # a vision-language checkpoint's: its own config (`mllmjax.models.vision`)
    params: Params | None = None
    # A LoRA checkpoint loaded with adapters=True: params are the adapters, base the base checkpoint.
    base: Checkpoint | None = None

    @property
    def lora(self) -> Any:
        """The `LoraConfig` of a LoRA checkpoint, else None."""
        entry = self.meta.get("lora")
        if not isinstance(entry, dict):
            return None
        from mllmjax.lora import config_from_meta

        return config_from_meta(entry)

    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (`mllmjax.tokenizer.load_tokenizer`: no torch import)."""
        from mllmjax.tokenizer import load_tokenizer

        try:
            return load_tokenizer(self.path)
        except Exception as e:
            raise ArtifactError(f"{self.path}: cannot load the tokenizer: {e}") from e

    @property
    def stop_ids(self) -> list[int]:
        return read_stop_ids(self.path)

    @property
    def has_opt_state(self) -> bool:
        return (self.path / "opt_state").is_dir()


def read_meta(path: str | os.PathLike[str], *, vision_language: bool = False) -> dict[str, Any]:
    """The checkpoint's metadata; ArtifactError if PATH is not a checkpoint. A vision-language checkpoint
    is refused (`refuse_vision_language`) unless the caller reads those (vision_language=True)."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        what = "does not exist" if not path.exists() else f"has no {META_FILE}"
        raise ArtifactError(
            f"{path} is not an mllmjax checkpoint: it {what} (make one with `mllmjax convert`)"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{meta_file}: unreadable checkpoint metadata: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"{meta_file}: format {got!r}, expected {FORMAT!r}")
    if not vision_language:
        refuse_vision_language(path, str(meta.get("family", "")))
    return meta


def refuse_vision_language(path: str | os.PathLike[str], family: str, what: str = "checkpoint") -> None:
    """BadInputError for a vision-language model (`family`) where only a text model is read: every
    command that loads a checkpoint reads its metadata first (`read_meta`), before it reads data or
    writes anything, and the ones that run vision-language models ask for them (`vision_language=True`:
    all the commands today), so this guards the code paths that take text models only."""
    if is_vision_language(family):
        raise BadInputError(f"{path} is a vision-language ({family}) {what}; this takes text models only")


def read_stop_ids(path: Path) -> list[int]:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return []
    eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def abstract_params(cfg: ModelConfig, dtype: Any, shardings: Params | None = None) -> Params:
    def leaf(path: str, spec: Any) -> jax.ShapeDtypeStruct:
        sharding = _get(shardings, path) if shardings is not None else None
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(spec[0], dtype, sharding=sharding)

    return map_specs(leaf, cfg.param_specs())


def _get(tree: Params, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    mesh: Any = None,
    dtype: Any = None,
    load_params: bool = True,
    adapters: bool = False,
    base: Checkpoint | None = None,
    vision_language: bool = False,
) -> Checkpoint:
    """Read a checkpoint; restore its params sharded onto `mesh` (default: one device) in `dtype`
    (default: the dtype it was saved in).

    A LoRA checkpoint gives its base's params with the adapters merged in (in the base's dtype, or
    `dtype`); with adapters=True, params are the float32 adapters and `base` the loaded base.
    base: that base checkpoint when the caller has it loaded already (it is used, not loaded again).
    vision_language: the caller reads vision-language checkpoints too (else they are refused)."""
    path = Path(path)
    meta = read_meta(path, vision_language=vision_language)
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: missing or unreadable config.json: {e}") from e
    cfg = model_config_from_hf(hf_config) if vision_language else from_hf_config(hf_config)
    ckpt = Checkpoint(path=path, meta=meta, hf_config=hf_config, cfg=cfg)
    if load_params and ckpt.lora is not None:
        return _load_lora(ckpt, mesh=mesh, dtype=dtype, adapters=adapters, base=base)
    if load_params:
        saved = jnp.dtype(meta.get("dtype", "float32"))
        dtype = jnp.dtype(dtype) if dtype is not None else saved
        expected = expected_checksums(meta, "params")
        shardings = param_shardings(cfg, mesh) if mesh is not None else None
        # Verification needs the arrays as saved: restore in the saved dtype, check, then cast.
        target = abstract_params(cfg, saved if expected is not None else dtype, shardings)
        params_dir = path / "params"
        if not params_dir.is_dir():
            raise ArtifactError(f"{path}: no params/ directory (incomplete checkpoint?)")
        ckpt.params = restore_tree(params_dir, target, "parameters")
        checksums.verify_tree(ckpt.params, expected, str(params_dir))
        if expected is not None and dtype != saved:
            ckpt.params = _cast_leafwise(ckpt.params, dtype)
        signal_point("loaded")
    return ckpt


def _load_lora(
    ckpt: Checkpoint, *, mesh: Any, dtype: Any, adapters: bool, base: Checkpoint | None = None
) -> Checkpoint:
    """A LoRA checkpoint's base (its content hash checked) and adapters; merged unless `adapters`."""
    from mllmjax import lora
    from mllmjax.sharding import spec_shardings

    entry = ckpt.meta["lora"]
    lcfg = ckpt.lora
    base_path = Path(str(entry.get("base", "")))
    if not (base_path / META_FILE).is_file():
        raise ArtifactError(
            f"{ckpt.path} holds LoRA adapters on the base {base_path}, which is gone; restore that "
            "checkpoint (or export this one with --merge where it still exists)"
        )
    # A vision-language model's adapters sit on its language model (params["text"]).
    text_cfg = getattr(ckpt.cfg, "text", ckpt.cfg)
    vision = text_cfg is not ckpt.cfg
    if base is None or base.params is None or Path(base.path).absolute() != base_path.absolute():
        base = load_checkpoint(base_path, mesh=mesh, dtype=dtype, vision_language=vision)
    got = lora.content_hash(base.meta, base.params)
    if got != entry.get("base_hash"):
        raise ArtifactError(
            f"{ckpt.path}: its base {base_path} has changed since the adapters were trained "
            f"(content hash {got[:12]} != {str(entry.get('base_hash'))[:12]})"
        )
    specs = lora.adapter_specs(text_cfg, lcfg)
    shardings = spec_shardings(specs, mesh) if mesh is not None else None

    def leaf(p: str, spec: Any) -> jax.ShapeDtypeStruct:
        sharding = (
            _get(shardings, p)
            if shardings is not None
            else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
        return jax.ShapeDtypeStruct(spec[0], jnp.dtype(ckpt.meta.get("dtype", "float32")), sharding=sharding)

    params_dir = ckpt.path / "params"
    if not params_dir.is_dir():
        raise ArtifactError(f"{ckpt.path}: no params/ directory (incomplete checkpoint?)")
    trained = restore_tree(params_dir, map_specs(leaf, specs), "LoRA adapters")
    checksums.verify_tree(trained, expected_checksums(ckpt.meta, "params"), str(params_dir))
    signal_point("loaded")
    if adapters:
        ckpt.params, ckpt.base = trained, base
    elif vision:
        ckpt.params = {**base.params, "text": lora.merge(base.params["text"], trained, lcfg, text_cfg)}
    else:
        ckpt.params = lora.merge(base.params, trained, lcfg, ckpt.cfg)
    return ckpt


def expected_checksums(meta: dict[str, Any], part: str) -> dict[str, str] | None:
    """The recorded checksums of `part` (params, opt_state) when they are to be verified, else None."""
    sums = meta.get("checksums")
    if not checksums.verify_enabled() or not isinstance(sums, dict):
        return None  # verification off, or a checkpoint written before checksums existed
    if sums.get("algorithm") != checksums.ALGORITHM or not isinstance(sums.get(part), dict):
        return None
    return sums[part]


def restore_tree(directory: Path, target: Any, what: str) -> Any:
    """Orbax's restore of `directory` onto `target`, its failures one ArtifactError line."""
    import orbax.checkpoint as ocp

    try:
        return ocp.StandardCheckpointer().restore(directory.absolute(), target)
    except Exception as e:
        raise ArtifactError(f"{directory}: cannot restore the {what}: {_reason(e)}") from e


def _reason(e: BaseException) -> str:
    """What went wrong, in one line: the innermost cause of a restore failure (tensorstore's own
    message, naming the array and file), without status-code prefixes or the reprs of bound methods
    that orbax's wrapper messages carry."""
    import re

    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
        chain.append(nxt)
    text = " ".join(str(chain[-1]).split()) or type(chain[-1]).__name__
    text = re.sub(r"<bound method [^>]*>", "", text)
    text = re.sub(r"^[A-Z_]+: ", "", text)
    return text[:400]


def _cast_leafwise(params: Params, dtype: Any) -> Params:
    """Cast each array and free its source at once: peak memory is the saved tree plus one array."""
    flat, treedef = jax.tree.flatten(params)
    out = []
    for i, x in enumerate(flat):
        out.append(x.astype(dtype))
        flat[i] = None
        x.delete()
    return jax.tree.unflatten(treedef, out)


# Files of a checkpoint that describe the checkpoint itself rather than the model: not carried over
# when a checkpoint is derived from another, or exported.
_OWN_FILES = (META_FILE, "config.json", "train_metrics.jsonl")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config of checkpoint src into dst."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in _OWN_FILES:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success rename it onto `out` (replacing an existing
    one only if force); on failure delete it, leaving `out` as it was.

    In a multi-host run every process gets the same directory (process 0's token) to write its shards
    into, and process 0 renames it once all of them are done (see mllmjax.distributed)."""
    from mllmjax import cleanup
    from mllmjax.distributed import barrier, is_primary, shared_token

    out = Path(out)
    check_output(out, force)
    tmp = out.parent / f".{out.name}.tmp-{shared_token()}"
    with cleanup.parents_of(out) if is_primary() else contextlib.nullcontext():
        if is_primary():
            cleanup.register(tmp, "dir")  # an interrupt (mllmjax_cli.interrupts) removes it
            tmp.mkdir()
        barrier(f"atomic_dir:{tmp.name}:made")
        try:
            yield tmp
            barrier(f"atomic_dir:{tmp.name}:written")
            if is_primary():
                os.chmod(tmp, cleanup.dir_mode())  # a copytree from a mkdtemp folder made it 0700
            signal_point("rename")
            if is_primary():
                old = None
                with cleanup.critical():  # an interrupt waits: OUT is never left moved aside
                    if out.exists():
                        check_output(out, force, probe=False)
                        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                        os.replace(out, old)
                    os.replace(tmp, out)
                    cleanup.unregister(tmp)
                    if old is not None:
                        cleanup.register(old, "dir")
                if old is not None:
                    cleanup.remove(old)
            barrier(f"atomic_dir:{tmp.name}:renamed")
        except BaseException:
            if is_primary():
                cleanup.remove(tmp)
            raise


def write_checkpoint(
    out: str | os.PathLike[str],
    *,
    params: Params,
    hf_config: dict[str, Any],
    write_tokenizer: Callable[[Path], None],
    source: str,
    step: int = 0,
    parent: str | None = None,
    force: bool = False,
    opt_state: Any = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint atomically. write_tokenizer(dir) writes the tokenizer files and
    generation_config.json into dir."""
    import orbax.checkpoint as ocp

    out = Path(out)
    leaves = jax.tree.leaves(params)
    dtype = dtype_name(leaves[0].dtype)
    cfg = model_config_from_hf(hf_config)
    # Every process takes part (the arrays may be sharded over hosts); process 0 writes them down.
    sums = {"algorithm": checksums.ALGORITHM, "params": checksums.tree_checksums(params)}
    if opt_state is not None:
        sums["opt_state"] = checksums.tree_checksums(opt_state)
    with atomic_dir(out, force) as tmp:
        # Synchronous, so the caller gets a complete artifact; uncompressed, because compressing float
        # weights saves little and makes tensorstore stage a second copy of every array.
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
        checkpointer.save((tmp / "params").absolute(), args=ocp.args.PyTreeSave(params))
        if opt_state is not None:
            checkpointer.save((tmp / "opt_state").absolute(), args=ocp.args.PyTreeSave(opt_state))
        if jax.process_index() == 0:
            write_tokenizer(tmp)
            hf = dict(hf_config)
            hf["dtype"] = dtype
            hf.pop("torch_dtype", None)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            meta = {
                "format": FORMAT,
                "family": cfg.family,
                "dtype": dtype,
                "source": source,
                "step": step,
                "parent": parent,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "num_params": int(sum(np.prod(x.shape) for x in leaves)),
                **(extra_meta or {}),
                "checksums": sums,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def stop_ids_for(tokenizer: Any, extra: list[int] | int | None = None) -> list[int]:
    """Stop ids: the given generation-config eos ids, the tokenizer's eos, and the chat end token."""
    ids: list[int] = []
    for e in extra if isinstance(extra, list) else ([extra] if extra is not None else []):
        ids.append(int(e))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in CHAT_END_TOKENS:
        if tok in vocab:
            ids.append(int(vocab[tok]))
    return sorted(set(ids))


def write_generation_config(out_dir: Path, stop_ids: list[int], base: dict[str, Any] | None = None) -> None:
    gen = dict(base or {})
    gen["eos_token_id"] = stop_ids
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
