"""HF / GGUF weights -> mllmjax checkpoint, and back (export).

convert: resolve the source, check the output path first (nothing is read before we know we may
write), build the config, stream tensors through the name table onto the mesh, and write the
checkpoint atomically. export: restore the params to host memory, write config + safetensors shards
(+ index) + tokenizer into a temporary folder renamed onto the output at the end.

A vision-language model (`mllmjax.models.registry.VISION_LANGUAGE`, by its config's architecture) takes
the same path through its own module: its config and loader (tower, projector and text model, each
through its own name table), the HF processor's files copied beside the tokenizer's, and on export its
own HF names (its module's `hf_tensors_from_params`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from mllmjax import cleanup
from mllmjax.checkpoint import (
    atomic_dir,
    check_output,
    copy_side_files,
    dtype_name,
    load_checkpoint,
    read_meta,
    resolve_dtype,
    write_checkpoint,
)
from mllmjax.errors import BadInputError, WeightsError
from mllmjax.models.config import ModelConfig
from mllmjax.models.registry import from_hf_config, is_vision_language, vision_language_of_hf
from mllmjax.models.transformer import param_bytes
from mllmjax.runtime import cache_dir
from mllmjax.sharding import make_mesh, param_shardings
from mllmjax.weights import WeightSource
from mllmjax.weights.table import hf_tensors_from_params, params_from_hf

EMBEDDED_NAMES = ("smollm2-135m",)
# export's largest safetensors file: above it the weights are split into shards named in
# model.safetensors.index.json (a tensor larger than this gets a shard of its own).
MAX_SHARD_BYTES = 2 * 1024**3


def resolve_source(spec: str) -> WeightSource:
    """A short name of an embedded model, a .gguf file, a local HF folder or weights file, or a hub id."""
    from mllmjax.weights.hf import HUB_ID, download_hub, open_hf_folder, open_weights_file

    if spec in EMBEDDED_NAMES:
        from mllmjax.weights.embedded import embedded_gguf_path

        spec = str(embedded_gguf_path(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BadInputError(f"no such GGUF file: {path}")
        from mllmjax.weights.gguf import open_gguf

        return open_gguf(path)
    if path.is_dir():
        if (path / "mllmjax.json").is_file():
            raise BadInputError(
                f"{path} is already an mllmjax checkpoint (use `mllmjax export` to go back to HF)"
            )
        return open_hf_folder(path)
    if path.is_file():
        return open_weights_file(path)
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return open_hf_folder(download_hub(spec))
    raise BadInputError(
        f"source {spec!r} is not a file, a folder, a hub id (owner/name) or an embedded model "
        f"({', '.join(EMBEDDED_NAMES)})"
    )


def _save_tokenizer(src: WeightSource, out_dir: Path) -> None:
    """Write the source's tokenizer files. A GGUF tokenizer is built in a child process: transformers
    materialises the whole vocabulary and merges as Python objects and keeps them after it is done; in
    a child that memory goes back to the OS before the weights stream in."""
    from mllmjax.weights.gguf import GGUFSource

    if not isinstance(src, GGUFSource):
        src.save_tokenizer(out_dir)
        return
    code = (
        "import sys\n"
        "from mllmjax.errors import MllmjaxError\n"
        "from mllmjax.weights.gguf import open_gguf\n"
        "try:\n"
        "    open_gguf(sys.argv[1]).save_tokenizer(sys.argv[2])\n"
        "except MllmjaxError as e:\n"
        "    sys.exit(str(e))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(src.path), str(out_dir)], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise WeightsError(lines[-1] if lines else f"building the tokenizer of {src.path} failed")


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    out: Path
    cfg: ModelConfig  # or a vision-language model's config (`mllmjax.models.vision`)
    dtype: str
    num_params: int
    param_bytes: int
    seconds: float


def convert(
    source: str,
    out: str | Path,
    *,
    dtype: str = "auto",
    mesh: Mesh | None = None,
    force: bool = False,
    on_tensor: Callable[[str, int, int], None] | None = None,
) -> ConvertResult:
    """Convert `source` into a checkpoint at `out`. on_tensor(name, done, total) reports progress."""
    start = time.perf_counter()
    out = Path(out)
    check_output(out, force)
    jdtype = resolve_dtype(dtype)
    device_mesh = mesh if mesh is not None else make_mesh()
    src = resolve_source(source)
    tok_dir = Path(tempfile.mkdtemp(prefix="mllmjax-tokenizer-"))
    cleanup.register(tok_dir, "dir")  # removed by an interrupt too (mllmjax_cli.interrupts)
    try:
        hf_config = src.hf_config()
        vl = vision_language_of_hf(hf_config)
        cfg = vl.config_from_hf(hf_config) if vl is not None else from_hf_config(hf_config)
        # The tokenizer first, before the parameters occupy memory.
        _save_tokenizer(src, tok_dir)
        if vl is not None:  # an HF folder: GGUF vision models are refused when opened
            src.save_processor(tok_dir)
        load = vl.params_from_hf if vl is not None else params_from_hf
        total = len(src.tensor_names())
        counter = [0]

        def tick(name: str) -> None:
            counter[0] += 1
            if on_tensor is not None:
                on_tensor(name, counter[0], total)

        params = load(
            cfg, src, dtype=np.dtype(jdtype), shardings=param_shardings(cfg, device_mesh), on_tensor=tick
        )
        write_checkpoint(
            out,
            params=params,
            hf_config=hf_config,
            write_tokenizer=lambda d: shutil.copytree(tok_dir, d, dirs_exist_ok=True),
            source=src.description,
            force=force,
        )
    finally:
        src.close()
        cleanup.remove(tok_dir)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return ConvertResult(out, cfg, dtype_name(jdtype), n, param_bytes(params), time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[str]
    dtype: str


def export(
    ckpt_path: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    merge: bool = False,
    adapter: bool = False,
) -> ExportResult:
    """Write CKPT as an HF folder (config.json, safetensors, tokenizer) that transformers loads.

    A LoRA checkpoint is written with its adapters merged into the base's weights (merge=True asks for
    that explicitly; the default dtype is then the base's), or with adapter=True as a PEFT adapter
    folder (`export_adapter`; a vision-language model's are its language model's). Both flags need a
    LoRA checkpoint and exclude each other. A vision-language checkpoint is written as its HF model
    (`LlavaForConditionalGeneration`, `Gemma3ForConditionalGeneration`), with the processor's files
    beside the tokenizer's.

    dtype: float32, bfloat16 or float16 (None: the checkpoint's). The weights go into one
    model.safetensors, or, when they take more than max_shard_bytes, into shards
    model-0000i-of-0000n.safetensors of at most max_shard_bytes each (in HF's order; a larger tensor
    gets a shard of its own) listed by model.safetensors.index.json. Each shard is written as soon
    as it is full, so only one shard's converted tensors are held besides the parameters."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise BadInputError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    ckpt_path, out = Path(ckpt_path), Path(out)
    meta = read_meta(ckpt_path, vision_language=True)
    vision = is_vision_language(str(meta.get("family", "")))
    if merge and adapter:
        raise BadInputError("--merge and --adapter exclude each other: merged weights, or a PEFT adapter")
    if (merge or adapter) and not isinstance(meta.get("lora"), dict):
        flag = "--merge" if merge else "--adapter"
        raise BadInputError(
            f"{ckpt_path} holds no LoRA adapters ({flag} needs a checkpoint of a --lora-rank run)"
        )
    check_output(out, force)
    if adapter:
        return export_adapter(ckpt_path, out, dtype=dtype, force=force, vision_language=vision)
    ckpt = load_checkpoint(ckpt_path, vision_language=vision)
    if vision:
        from mllmjax.models.vision import vlm

        tensors = vlm.module(ckpt.cfg).hf_tensors_from_params
    else:
        tensors = hf_tensors_from_params
    target = np.dtype(resolve_dtype(dtype)) if dtype not in (None, "") else None
    params = jax.tree.map(np.asarray, ckpt.params)
    out_dtype = dtype_name(target if target is not None else jax.tree.leaves(params)[0].dtype)
    files: list[str] = []
    with atomic_dir(out, force) as tmp:
        from mllmjax.weights.safetensors_io import write_safetensors

        written: list[tuple[Path, list[str]]] = []  # (temporary file, its tensors), in order
        pending: list[tuple[str, np.ndarray]] = []
        size = total = 0

        def flush() -> None:
            path = tmp / f".shard-{len(written)}.safetensors"
            write_safetensors(path, pending)
            written.append((path, [name for name, _ in pending]))

        for name, arr in tensors(ckpt.cfg, params, target):
            if pending and size + arr.nbytes > max_shard_bytes:
                flush()
                pending, size = [], 0
            pending.append((name, arr))
            size += arr.nbytes
            total += arr.nbytes
        flush()
        pending = []
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(written):
            fname = (
                "model.safetensors"
                if len(written) == 1
                else f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            )
            os.replace(path, tmp / fname)
            files.append(fname)
            weight_map.update(dict.fromkeys(names, fname))
        if len(written) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            files.append("model.safetensors.index.json")
        hf = dict(ckpt.hf_config)
        hf["dtype"] = out_dtype
        if vision:  # the parts' own configs say the dtype too; the ties are as the source had them
            for key in ("vision_config", "text_config"):
                if isinstance(hf.get(key), dict):
                    hf[key] = {**hf[key], "dtype": out_dtype}
                    hf[key].pop("torch_dtype", None)
        else:
            hf["tie_word_embeddings"] = ckpt.cfg.tie_word_embeddings
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        files += copy_side_files(ckpt_path, tmp)
    return ExportResult(out, sorted(files), out_dtype)


ADAPTER_FILE = "adapter_model.safetensors"


def export_adapter(
    ckpt_path: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    vision_language: bool = False,
) -> ExportResult:
    """A LoRA checkpoint's adapters as a PEFT folder: adapter_config.json and adapter_model.safetensors
    (lora_A [r, in] and lora_B [out, r] per HF module), which `peft.PeftModel.from_pretrained(base, OUT)`
    loads onto the base model (the base is named by its HF export in base_model_name_or_path).

    A vision-language checkpoint's adapters are its language model's: they are named as transformers
    5 names that model's modules inside the VLM (`model.language_model.layers.{i}...`), and
    target_modules matches those modules only (the tower has q_proj/v_proj of its own)."""
    from mllmjax import lora
    from mllmjax.weights.safetensors_io import write_safetensors

    ckpt_path, out = Path(ckpt_path), Path(out)
    ckpt = load_checkpoint(ckpt_path, adapters=True, vision_language=vision_language)
    lcfg = ckpt.lora
    target = np.dtype(resolve_dtype(dtype)) if dtype not in (None, "") else np.dtype(np.float32)
    adapters = jax.tree.map(np.asarray, ckpt.params)
    base = str(ckpt.meta["lora"]["base"])
    if vision_language:
        old, new = lora.VLM_TEXT_MODULES
        tensors, modules = lora.peft_tensors(ckpt.cfg.text, lcfg, adapters, target, rename=(old, new))
        config = lora.peft_config(lcfg, modules, base, within=new)
    else:
        tensors, modules = lora.peft_tensors(ckpt.cfg, lcfg, adapters, target)
        config = lora.peft_config(lcfg, modules, base)
    with atomic_dir(out, force) as tmp:
        write_safetensors(tmp / ADAPTER_FILE, tensors)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(ckpt_path, tmp)
    return ExportResult(out, sorted(p.name for p in out.iterdir()), dtype_name(target))


def resolve_model(spec: str, *, dtype: str = "auto", on_convert: Callable[[str], None] | None = None) -> Path:
    """A checkpoint directory for `spec`: the checkpoint itself, or the cached conversion of a hub id,
    HF folder/file, GGUF or embedded model (converted on first use; the conversion is atomic, so an
    interrupted one is redone). A vision-language model resolves like a text one."""
    from mllmjax.checkpoint import META_FILE

    path = Path(spec).expanduser()
    if (path / META_FILE).is_file():
        read_meta(path, vision_language=True)  # a clear error for what is not a checkpoint
        return path
    key = str(path.resolve()) if path.exists() else spec
    if path.is_file():
        key += f":{path.stat().st_size}:{path.stat().st_mtime_ns}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name if path.exists() else spec).strip("_")[:60]
    dt = np.dtype(resolve_dtype(dtype)).name if dtype == "auto" else dtype
    digest = hashlib.sha256(f"{key}|{dt}".encode()).hexdigest()[:10]
    out = cache_dir() / "models" / f"{slug}-{dt}-{digest}"
    if not (out / META_FILE).is_file():
        if on_convert is not None:
            on_convert(str(out))
        convert(spec, out, dtype=dt, force=out.exists())
    return out
