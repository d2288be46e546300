"""LoRA: adapters on a frozen base against PEFT (torch autograd), the `train` checkpoints that hold only
adapters, bitwise resume, export (merged and PEFT), and bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import save_hf_model
from typer.testing import CliRunner

from mllmjax import lora
from mllmjax.checkpoint import load_checkpoint
from mllmjax.convert import convert
from mllmjax.errors import BadInputError
from mllmjax.loss import LossConfig
from mllmjax.models import transformer
from mllmjax.optim import OptimConfig
from mllmjax.records import read_records
from mllmjax.trainer import TrainConfig, Trainer
from mllmjax.training import batch_from_records
from mllmjax_cli.main import app

peft = pytest.importorskip("peft")
runner = CliRunner()
TOL = 1e-4
_converted: dict[str, tuple] = {}


def _convert(name, tmp_path_factory):
    if name not in _converted:
        folder = tmp_path_factory.mktemp(name)
        model = save_hf_model(name, folder / "hf")
        convert(str(folder / "hf"), folder / "ckpt")
        _converted[name] = (model, load_checkpoint(folder / "ckpt"), folder)
    return _converted[name]


def _random_adapters(cfg, lcfg, seed):
    """Adapters with b != 0 (fresh ones have b = 0), so the low-rank path shows in every output."""
    fresh = lora.init_adapters(cfg, lcfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(fresh))))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), fresh)


def _peft_model(model, lcfg, adapters, cfg, tmp):
    """A PEFT model on a copy of the HF model, its adapters loaded from our PEFT export of `adapters`."""
    import copy

    from safetensors.torch import save_file

    tensors, modules = lora.peft_tensors(cfg, lcfg, jax.tree.map(np.asarray, adapters))
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(v) for k, v in tensors}, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps(lora.peft_config(lcfg, modules, "base")))
    return peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp), is_trainable=True)


@pytest.mark.parametrize("name", ["llama-linear-rope-bias", "qwen3", "gemma3", "qwen3-moe", "qwen3-moe-mixed"])
def test_fresh_adapters_leave_the_model_exactly_as_it_was(name, tmp_path_factory):
    """b = 0: the low-rank path (and the merged experts of a mixture of experts) adds exactly 0."""
    _, ckpt, _ = _convert(name, tmp_path_factory)
    lcfg = lora.LoraConfig(rank=3, alpha=6.0)
    adapters = lora.init_adapters(ckpt.cfg, lcfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, ckpt.cfg.vocab_size, (2, 11))
    base = transformer.logits(ckpt.params, ckpt.cfg, tokens)
    adapted = transformer.logits(lora.attach(ckpt.params, adapters, lcfg, ckpt.cfg), ckpt.cfg, tokens)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))
    merged = transformer.logits(lora.merge(ckpt.params, adapters, lcfg, ckpt.cfg), ckpt.cfg, tokens)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(merged))


@pytest.mark.parametrize("name", ["llama-linear-rope-bias", "qwen3", "gemma2", "qwen3-moe-mixed"])
def test_logits_and_adapter_gradients_match_peft_autograd(name, tmp_path_factory):
    """Random adapters on every target: our logits equal PEFT's on the HF model within 1e-4, and the
    gradient of a linear function of the logits w.r.t. every lora_A / lora_B equals torch autograd's
    (compared in PEFT's layout, through the export's own mapping). On the Qwen3-MoE with dense MLPs
    among its expert layers, "every target" is the attention's four."""
    model, ckpt, folder = _convert(name, tmp_path_factory)
    lcfg = lora.LoraConfig(rank=3, alpha=5.0)
    adapters = _random_adapters(ckpt.cfg, lcfg, 1)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, ckpt.cfg.vocab_size, (2, 13))
    weights = rng.standard_normal((2, 13, ckpt.cfg.vocab_size)).astype(np.float32)

    def ours(ad):
        params = lora.attach(ckpt.params, ad, lcfg, ckpt.cfg)
        return (transformer.logits(params, ckpt.cfg, tokens) * weights).sum()

    grads = jax.grad(ours)(adapters)
    pm = _peft_model(model, lcfg, adapters, ckpt.cfg, folder / "peft-ref")
    out = pm(torch.tensor(tokens)).logits
    logits = transformer.logits(lora.attach(ckpt.params, adapters, lcfg, ckpt.cfg), ckpt.cfg, tokens)
    assert np.abs(np.asarray(logits) - out.detach().numpy()).max() <= TOL
    (out * torch.tensor(weights)).sum().backward()
    ref = {n.replace(".default", ""): p.grad.numpy() for n, p in pm.named_parameters() if "lora_" in n}
    mine = dict(lora.peft_tensors(ckpt.cfg, lcfg, jax.tree.map(np.asarray, grads))[0])
    targets = 4 if ckpt.cfg.layer_stacks() else 7
    assert set(mine) == set(ref) and len(ref) == 2 * targets * ckpt.cfg.num_layers
    for key, g in mine.items():
        assert np.abs(g - ref[key]).max() <= TOL * max(1.0, np.abs(ref[key]).max()), key


def test_mixed_moe_layers_take_attention_targets_and_refuse_mlp_ones(tmp_path_factory):
    _, ckpt, _ = _convert("qwen3-moe-mixed", tmp_path_factory)
    assert lora.resolved_targets(ckpt.cfg, lora.LoraConfig(rank=2)) == ("q", "k", "v", "o")
    for target in ("gate", "experts_up"):
        with pytest.raises(BadInputError, match=f"LoRA target '{target}' is not supported on a model with mixed"):
            lora.resolved_targets(ckpt.cfg, lora.LoraConfig(rank=2, targets=("q", target)))


def test_dropout_masks_do_not_depend_on_the_layer_loop(tmp_path_factory):
    """One key gives the same dropout masks whether the layers are scanned or unrolled (the per-layer
    keys are drawn for [layers, targets] in both layouts), so a run's loss does not change with it."""
    _, ckpt, _ = _convert("qwen3", tmp_path_factory)
    lcfg = lora.LoraConfig(rank=3, alpha=5.0, dropout=0.5)
    adapters = _random_adapters(ckpt.cfg, lcfg, 2)
    batch = batch_from_records(_records(ckpt))
    key = jax.random.key_data(jax.random.key(7))
    grads = []
    for loop in ("scan", "unroll"):
        trainer = Trainer(
            ckpt.cfg, TrainConfig(lora=lcfg, layer_loop=loop, loss=LossConfig(beta=0)), base=ckpt.params
        )
        grads.append(trainer._grads_jit(adapters, batch, ckpt.params, micro_batch=None, key=key)[0])
        nodrop = trainer.grads(adapters, batch)[0]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert any(
        not np.allclose(a, c) for a, c in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(nodrop), strict=True)
    )


def _records(ckpt):
    """Scored records of random tokens for `ckpt` (no tokenizer needed by batch_from_records)."""
    from mllmjax.records import RolloutRecord

    rng = np.random.default_rng(0)
    out = []
    for i in range(4):
        prompt = rng.integers(0, ckpt.cfg.vocab_size, 3 + i).tolist()
        completion = rng.integers(0, ckpt.cfg.vocab_size, 5 - i).tolist()
        out.append(
            RolloutRecord(
                prompt_id=str(i // 2), group=i // 2, sample=i % 2, prompt="p", prompt_ids=prompt,
                completion="c", completion_ids=completion, logprobs=[0.0] * len(completion),
                finish_reason="stop", answer="1", policy="test", rewards={"x": 0.0}, reward=0.0,
                advantage=float(rng.normal()), reward_errors={},
            )
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------- CLI
TRAIN = ["--ppo-epochs", "2", "--minibatches", "2", "--lr", "1e-2", "--steps", "2", "--beta", "0.04",
         "--seed", "5", "--lora-rank", "4", "--lora-alpha", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(scored_files):
    """A converted tiny model and two scored rollout files with random advantages (conftest)."""
    return scored_files


def train(setup, ckpt, scored, out, *extra):
    return runner.invoke(
        app, ["train", str(setup / ckpt), str(setup / scored), "-o", str(setup / out), *TRAIN, *extra]
    )


def test_train_writes_only_adapters_and_changes_only_their_weights(setup):
    result = train(setup, "ck0", "s1.jsonl", "l1")
    assert result.exit_code == 0, result.output
    meta = json.loads((setup / "l1/mllmjax.json").read_text())
    entry = meta["lora"]
    assert entry["rank"] == 4 and entry["alpha"] == 8 and entry["base"] == str((setup / "ck0").absolute())
    assert entry["targets"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert entry["base_hash"] == lora.content_hash(json.loads((setup / "ck0/mllmjax.json").read_text()))
    assert meta["reference"] == entry["base"] and meta["updates"] == 4
    history = [json.loads(line) for line in (setup / "l1/train_metrics.jsonl").read_text().splitlines()]
    assert history[0]["kl"] == 0 and history[-1]["kl"] > 0  # KL to the base grows
    adapters = load_checkpoint(setup / "l1", adapters=True)
    assert meta["num_params"] == lora.adapter_count(adapters.params)
    assert {x.dtype.name for x in jax.tree.leaves(adapters.params)} == {"float32"}
    c = adapters.cfg  # r x (in + out) per target and layer, by hand
    kv, q = c.num_kv_heads * c.head_dim, c.num_heads * c.head_dim
    d, f = c.hidden_size, c.intermediate_size
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)
    assert meta["num_params"] == c.num_layers * 4 * per_layer
    before, after = load_checkpoint(setup / "ck0").params, load_checkpoint(setup / "l1").params
    for path, a in jax.tree_util.tree_leaves_with_path(before):
        b = after
        for k in path:
            b = b[k.key]
        changed = not np.array_equal(np.asarray(a), np.asarray(b))
        target = path[0].key == "layers" and path[1].key in entry["targets"]
        assert changed == target, jax.tree_util.keystr(path)


def test_resume_equals_an_uninterrupted_run_bitwise(setup):
    assert train(setup, "ck0", "s1.jsonl", "r1").exit_code == 0
    result = train(setup, "r1", "s2.jsonl", "r2", "--resume")
    assert result.exit_code == 0, result.output
    meta = json.loads((setup / "r2/mllmjax.json").read_text())
    assert meta["updates"] == 8 and meta["lora"]["base"] == str((setup / "ck0").absolute())

    ck0 = load_checkpoint(setup / "ck0")
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    cfg = TrainConfig(
        loss=LossConfig(beta=0.04), optim=OptimConfig(peak_lr=1e-2, total_updates=8), ppo_epochs=2,
        minibatches=2, lora=lcfg,
    )  # fmt: skip
    trainer = Trainer(ck0.cfg, cfg, base=ck0.params)
    adapters = lora.init_adapters(ck0.cfg, lcfg, jax.random.fold_in(jax.random.key(5), 7))
    state = trainer.init_state(adapters, jax.random.key_data(jax.random.key(5)))
    for name in ("s1", "s2"):
        state, _ = trainer.train_on_batch(state, batch_from_records(read_records(setup / f"{name}.jsonl")))
    resumed = load_checkpoint(setup / "r2", adapters=True).params
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_export_merged_and_as_a_peft_adapter(setup):
    """--merge: transformers loads the merged model with our merged logits; --adapter: PEFT loads the
    adapter onto the base's HF export with the same logits (float32, within 1e-4)."""
    from transformers import AutoModelForCausalLM

    assert train(setup, "ck0", "s1.jsonl", "e1").exit_code == 0
    ckpt = load_checkpoint(setup / "e1")
    tokens = np.random.default_rng(1).integers(0, ckpt.cfg.vocab_size, (2, 9))
    ours = np.asarray(transformer.logits(ckpt.params, ckpt.cfg, tokens))
    for args, out in ((["--merge"], "e1-merged"), ([], "e1-default")):
        result = runner.invoke(app, ["export", str(setup / "e1"), *args, "-o", str(setup / out)])
        assert result.exit_code == 0, result.output
        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(setup / out)(torch.tensor(tokens)).logits.numpy()
        assert np.abs(ours - ref).max() <= TOL
    result = runner.invoke(app, ["export", str(setup / "e1"), "--adapter", "-o", str(setup / "e1-peft")])
    assert result.exit_code == 0, result.output
    config = json.loads((setup / "e1-peft/adapter_config.json").read_text())
    assert (
        config["r"] == 4
        and config["lora_alpha"] == 8
        and sorted(config["target_modules"])
        == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    )
    assert runner.invoke(app, ["export", str(setup / "ck0"), "-o", str(setup / "ck0-hf")]).exit_code == 0
    base = AutoModelForCausalLM.from_pretrained(setup / "ck0-hf")
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(base, setup / "e1-peft")(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - ref).max() <= TOL


def _bad(setup, args, fragment, out="bad-out"):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and result.output.strip().count("\n") == 0, result.output
    assert not (setup / out).exists()


def test_bad_input(setup):
    s1 = str(setup / "s1.jsonl")
    common = ["train", str(setup / "ck0"), s1, "-o", str(setup / "bad-out")]
    _bad(setup, [*common, "--lora-rank", "-1"], "lora rank must be")
    _bad(setup, [*common, "--lora-rank", "4", "--lora-targets", "q,wq"], "unknown LoRA target 'wq'")
    _bad(setup, [*common, "--lora-rank", "4", "--lora-alpha", "0"], "lora alpha must be > 0")
    _bad(setup, [*common, "--lora-rank", "4", "--lora-dropout", "1"], "lora dropout must be in [0, 1)")
    assert train(setup, "ck0", "s1.jsonl", "b1").exit_code == 0
    _bad(setup, ["train", str(setup / "b1"), s1, "-o", str(setup / "bad-out"), *TRAIN[:-4], "--lora-rank", "8"],
         "holds rank-4 adapters")  # fmt: skip
    _bad(setup, ["export", str(setup / "b1"), "--merge", "--adapter", "-o", str(setup / "bad-out")],
         "--merge and --adapter exclude each other")  # fmt: skip
    _bad(
        setup,
        ["export", str(setup / "ck0"), "--adapter", "-o", str(setup / "bad-out")],
        "holds no LoRA adapters",
    )
    # The base changes under the adapters: loading refuses it, naming the base.
    shutil.copytree(setup / "ck0", setup / "ck0-saved")
    try:
        meta = json.loads((setup / "ck0/mllmjax.json").read_text())
        first = sorted(meta["checksums"]["params"])[0]
        meta["checksums"]["params"][first] = "0" * 16
        (setup / "ck0/mllmjax.json").write_text(json.dumps(meta))
        result = runner.invoke(
            app, ["--no-verify", "export", str(setup / "b1"), "-o", str(setup / "bad-out")]
        )
        assert result.exit_code != 0 and re.search(r"its base .*ck0 has changed", result.output), (
            result.output
        )
        assert not (setup / "bad-out").exists()
    finally:
        shutil.rmtree(setup / "ck0")
        shutil.move(setup / "ck0-saved", setup / "ck0")


def test_memory_estimate_counts_adapters_not_a_second_model(setup):
    from mllmjax import memory

    ckpt = load_checkpoint(setup / "ck0", load_params=False)
    full = TrainConfig(loss=LossConfig(beta=0.04))
    lcfg = lora.LoraConfig(rank=4)
    low = dataclasses.replace(full, lora=lcfg)
    kw = dict(rows=8, seq_len=64, param_dtype="float32", mesh=None)
    a, b = memory.for_train_config(ckpt.cfg, full, **kw), memory.for_train_config(ckpt.cfg, low, **kw)
    adapters = 4 * lora.adapter_count(lora.init_adapters(ckpt.cfg, lcfg, jax.random.key(0)))
    assert b.parts["reference"] == 0 and a.parts["reference"] == a.parts["params"]
    assert b.parts["adapters"] == adapters and b.parts["grads"] == 2 * adapters
    assert b.parts["optimizer"] == adapters  # lion: one slot
    assert b.parts["activations"] == a.parts["activations"] and b.total < a.total
    assert jnp.dtype(ckpt.meta["dtype"]) == jnp.float32


# -------------------------------------------------------------------------------------------- grpo
GRPO = ["--data", "builtin:sums", "-G", "4", "--prompts-per-step", "2", "--max-new-tokens", "8",
        "--reward", "correct=1.0", "--reward-fn", "grpo_rewards:even=1", "--lr", "1e-2", "--beta", "0.04",
        "--optimizer", "adamw", "--seed", "3", "--lora-rank", "4", "--lora-targets", "q,v,down", "--steps", "2", "--save-every", "1",
        "--save-rollouts"]  # fmt: skip


def test_grpo_samples_with_the_adapters_and_resumes_exactly(setup, tmp_path, monkeypatch):
    """A LoRA grpo run on an fsdp=8 mesh: checkpoints hold adapters on the start model; step 2's
    rollouts were sampled from the adapted policy (their log-probs are the step-1 checkpoint's merged
    model's, not the base's), the sampler and trainer agree, and a run killed mid-update resumes to
    the same adapters and optimizer state bit for bit."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import orbax.checkpoint as ocp

    from mllmjax.sharding import make_mesh

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the grpo_rewards reward module
    straight = tmp_path / "straight"
    args = ["grpo", "--model", str(setup / "ck0"), *GRPO, "--mesh", "fsdp=8"]
    result = runner.invoke(app, [*args, "-o", str(straight)])
    assert result.exit_code == 0, result.output
    meta = json.loads((straight / "checkpoints/step_2/mllmjax.json").read_text())
    assert meta["lora"]["targets"] == ["q", "v", "down"] and meta["reference"] == str(
        (setup / "ck0").absolute()
    )
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["logp_mismatch_max"] < 1e-4 for r in rows)

    records = read_records(straight / "rollouts/step_2.jsonl")
    batch = batch_from_records(records)
    plain = Trainer(
        load_checkpoint(setup / "ck0", load_params=False).cfg, TrainConfig(loss=LossConfig(beta=0))
    )
    policy = np.asarray(plain.logprobs(load_checkpoint(straight / "checkpoints/step_1").params, batch))
    base = np.asarray(plain.logprobs(load_checkpoint(setup / "ck0").params, batch))
    sampled = np.asarray(batch.sampler_logps)
    mask = np.asarray(batch.completion)
    assert np.abs(policy - sampled)[mask].max() < 1e-4
    assert np.abs(base - sampled)[mask].max() > 1e-3  # the adapters moved the policy the sampler used

    root = Path(__file__).parent.parent
    env = {
        **__import__("os").environ,
        "PYTHONPATH": f"{root / 'lib'}:{root}:{root / 'tests'}",
        "MLLMJAX_CRASH_AT": "update@2",
    }
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mllmjax_cli.main", *args, "-o", str(killed)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr
    del env["MLLMJAX_CRASH_AT"]
    resume = [sys.executable, "-m", "mllmjax_cli.main", "grpo", "--resume", str(killed)]
    last = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr
    for part in ("params", "opt_state"):
        a = ocp.StandardCheckpointer().restore((straight / "checkpoints/step_2" / part).absolute())
        b = ocp.StandardCheckpointer().restore((killed / "checkpoints/step_2" / part).absolute())
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert make_mesh("fsdp=8").size == 8


@pytest.mark.parametrize("merge", [True, False])
def test_the_sampler_decodes_the_adapted_policy(merge, tmp_path_factory, monkeypatch):
    """Greedy decoding with the adapters attached equals decoding the merged weights, whether the CPU
    decode loop merges them into its output-major copy or runs the low-rank path beside it."""
    from mllmjax.sampling import Greedy, generate, programs

    _, ckpt, _ = _convert("qwen3", tmp_path_factory)
    lcfg = lora.LoraConfig(rank=3, alpha=5.0)
    adapters = jax.tree.map(lambda x: 4 * x, _random_adapters(ckpt.cfg, lcfg, 4))
    prompts = [[5, 9, 17, 2, 33], [7, 1, 4]]
    monkeypatch.setattr(programs, "MERGE_ADAPTERS", merge)
    programs.compiled.cache_clear()
    programs.sliced_layers.cache_clear()
    kw = dict(max_new_tokens=6, stop_ids=[])
    got = generate(lora.attach(ckpt.params, adapters, lcfg, ckpt.cfg), ckpt.cfg, prompts, Greedy(), **kw)
    want = generate(lora.merge(ckpt.params, adapters, lcfg, ckpt.cfg), ckpt.cfg, prompts, Greedy(), **kw)
    base = generate(ckpt.params, ckpt.cfg, prompts, Greedy(), **kw)
    programs.compiled.cache_clear()
    programs.sliced_layers.cache_clear()
    assert [c.ids for c in got] == [c.ids for c in want] != [c.ids for c in base]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def _mlp_loss(x, gate, up, down):
    from mllmjax.models.blocks.mlp import swiglu_mlp

    return jnp.sum(jnp.square(swiglu_mlp(x, gate, up, down)))


def test_adapted_product_values_gradients_and_live_buffers():
    """`blocks.cpu.adapted_dense` is x w + scale (xd a) b with autodiff's gradients (x through both
    terms, xd the dropout path's input, w frozen), and an adapted MLP's backward holds no more than a
    frozen one's plus the adapters' input: summing two products instead let XLA:CPU keep both
    [tokens, F] addends of gate and up alive until the backward."""
    from mllmjax.models.blocks.adapters import Adapted
    from mllmjax.models.blocks.cpu import adapted_dense

    n, d, f, r, scale = 512, 64, 256, 4, 2.0
    ks = jax.random.split(jax.random.key(0), 12)
    x, xd = jax.random.normal(ks[0], (2, n // 2, d)), jax.random.normal(ks[1], (2, n // 2, d))
    w, a, b = (
        jax.random.normal(ks[2], (d, f)),
        jax.random.normal(ks[3], (d, r)),
        jax.random.normal(ks[4], (r, f)),
    )
    plain = lambda x, xd, a, b: jnp.sum(jnp.sin(x @ w + scale * (xd @ a) @ b))  # noqa: E731
    ours = lambda x, xd, a, b: jnp.sum(jnp.sin(adapted_dense(x, xd, w, a, b, scale)))  # noqa: E731
    want = jax.grad(plain, argnums=(0, 1, 2, 3))(x, xd, a, b)
    got = jax.grad(ours, argnums=(0, 1, 2, 3))(x, xd, a, b)
    np.testing.assert_allclose(ours(x, xd, a, b), plain(x, xd, a, b), rtol=1e-5)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(jnp.abs(e).max()))

    weights = [jax.random.normal(k, s) for k, s in zip(ks[5:8], [(d, f), (d, f), (f, d)], strict=True)]
    adapters = [(jax.random.normal(k, (d, r)), jnp.ones((r, f))) for k in ks[8:10]]

    def adapted(ad, x):
        (ag, bg), (au, bu) = ad
        gate = Adapted(weights[0], ag, bg, scale=scale, n_in=1)
        up = Adapted(weights[1], au, bu, scale=scale, n_in=1)
        return _mlp_loss(x, gate, up, weights[2])

    def temp_bytes(fn, *args):
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    lora_temp = temp_bytes(jax.grad(adapted), adapters, x)
    frozen_temp = temp_bytes(jax.grad(lambda x: _mlp_loss(x, *weights)), x)
    # The adapters' own backward needs x (n x d) besides what the frozen MLP keeps; one [n, f] more
    # would be the bug (both addends of gate or up kept).
    assert lora_temp <= frozen_temp + 4 * n * d + 4 * n * f // 2, (lora_temp, frozen_temp)
