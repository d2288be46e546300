"""Qwen3-MoE: the routed experts against every expert computed densely, their FLOPs, and the whole
family against HF transformers (logits, cached decoding, greedy `generate`, the router's
load-balancing loss, one training step's gradient against torch autograd, the export round trip), on
8 fake devices with an expert axis, and its refusals."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import checkpoint_tensors, save_hf_model
from typer.testing import CliRunner

from mllmjax import models
from mllmjax.checkpoint import load_checkpoint
from mllmjax.convert import convert
from mllmjax.errors import UnsupportedModelError
from mllmjax.loss import LossConfig
from mllmjax.models import registry, transformer
from mllmjax.models.blocks import moe
from mllmjax.models.blocks.cpu import OutMajor
from mllmjax.models.cache import init_cache
from mllmjax.optim import OptimConfig
from mllmjax.sampling import Greedy, generate
from mllmjax.sharding import make_mesh, place_rows, shard_params
from mllmjax.trainer import Batch, TrainConfig, Trainer
from mllmjax.weights.table import params_from_hf
from mllmjax_cli.main import app

TOL = 1e-4
FORMS = ("loop", "blocks", "ragged")


# ----------------------------------------------------------------------------- the routed MLP
def _moe_inputs(b=3, t=37, d=24, f=20, e=7, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    router = jnp.asarray(rng.standard_normal((d, e)), jnp.float32)
    gate, up = (jnp.asarray(0.2 * rng.standard_normal((e, d, f)), jnp.float32) for _ in range(2))
    down = jnp.asarray(0.2 * rng.standard_normal((e, f, d)), jnp.float32)
    valid = jnp.asarray(rng.random((b, t)) > 0.2)
    return (x, router, gate, up, down), valid


def _run(impl, params, valid, norm=True, k=2):
    return moe.moe_mlp(*params, top_k=k, norm_topk_prob=norm, valid=valid, impl=impl)


@pytest.mark.parametrize("norm", [True, False])
def test_routed_forms_equal_every_expert_computed_densely(norm):
    """Each grouped form (values and every input's gradient, router statistics included) equals running
    every expert on every token and weighting by the router; padding tokens get 0."""
    params, valid = _moe_inputs()
    cot = np.random.default_rng(1).standard_normal(params[0].shape).astype(np.float32)
    cot = jnp.asarray(cot) * valid[..., None]

    def loss(impl, *p):
        y, stats = _run(impl, p, valid, norm)
        return jnp.sum(y * cot) + moe.load_balancing_loss(stats)

    ref_y, ref_stats = _run("dense", params, valid, norm)
    ref_grads = jax.grad(lambda *p: loss("dense", *p), argnums=range(5))(*params)
    for form in FORMS:
        y, stats = jax.jit(lambda *p, form=form: _run(form, p, valid, norm))(*params)
        np.testing.assert_allclose(np.where(valid[..., None], y, 0), np.where(valid[..., None], ref_y, 0),
                                   atol=1e-5, rtol=0, err_msg=form)  # fmt: skip
        assert not np.asarray(y)[~np.asarray(valid)].any(), form
        for key in stats:
            np.testing.assert_allclose(stats[key], ref_stats[key], rtol=1e-6, err_msg=key)
        grads = jax.jit(jax.grad(lambda *p, form=form: loss(form, *p), argnums=range(5)))(*params)
        for g, r in zip(grads, ref_grads, strict=True):
            assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-5 * np.abs(np.asarray(r)).max(), form


def test_output_major_weights_of_a_cpu_decode_loop():
    """The sampler's CPU decode loop hands the block `OutMajor` copies of its matrices
    (`blocks.cpu.out_major_layer`): the loop and the dense form read them as the stacked weights."""
    params, valid = _moe_inputs(b=16, t=1, seed=2)
    x, router, gate, up, down = params

    def out_major(w):  # as out_major_layer makes them: [E, in, out] -> [out, E * in]
        return OutMajor(w.reshape(-1, w.shape[-1]).T, (w.shape[-1],))

    om = (x, OutMajor(router.T, (router.shape[1],)), out_major(gate), out_major(up), out_major(down))
    ref, _ = _run("dense", params, valid)
    for form in ("loop", "dense"):
        y, _ = _run(form, om, valid)
        np.testing.assert_allclose(np.where(valid[..., None], y, 0), np.where(valid[..., None], ref, 0),
                                   atol=1e-5, rtol=0, err_msg=form)  # fmt: skip


def test_dispatch_puts_every_pair_in_a_block_of_its_expert():
    rng = np.random.default_rng(3)
    n, k, e = 50, 3, 9
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    valid = jnp.asarray(rng.random(n) > 0.1)
    bs = moe.block_rows(n * k, e)
    plan = moe.dispatch(idx, valid, e, bs)
    rows = moe.num_blocks(n * k, e, bs) * bs
    pair_row, row_token = np.asarray(plan.pair_row), np.asarray(plan.row_token)
    block_expert = np.asarray(plan.block_expert)
    for p in range(n * k):
        token, expert = p // k, int(idx.reshape(-1)[p])
        if not valid[token]:
            assert pair_row[p] == rows  # padding tokens go nowhere
            continue
        assert row_token[pair_row[p]] == token and block_expert[pair_row[p] // bs] == expert
    used = int(plan.used_blocks)
    assert used * bs == int(plan.group_rows.sum()) <= rows
    assert (row_token[used * bs :] == n).all()  # the blocks past the used ones hold no pair


def _cost_flops(impl, n, d, f, e, k):
    shapes = [(1, n, d), (d, e), (e, d, f), (e, d, f), (e, f, d)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    fn = lambda *a: moe.moe_mlp(*a, top_k=k, norm_topk_prob=True, impl=impl)[0]  # noqa: E731
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize(
    "dims", [(48, 36, 5, 2), (64, 40, 8, 2), (2048, 768, 128, 8)], ids=["tiny", "8x2", "qwen3-30b-a3b"]
)
def test_flops_are_proportional_to_the_routed_experts(dims):
    """XLA's cost analysis of one MoE layer (router, dispatch, experts, weighted sum) at 1024 tokens:
    within 1.5 x top-k / E of the FLOPs of every expert on every token. Measured on the "blocks" form,
    whose static shapes XLA counts; the "loop" form runs at most the same blocks (its trip count is
    the used blocks), which a cost analysis cannot see (it counts a loop body once)."""
    d, f, e, k = dims
    routed, dense = _cost_flops("blocks", 1024, d, f, e, k), _cost_flops("dense", 1024, d, f, e, k)
    assert routed <= 1.5 * (k / e) * dense, (routed, dense, routed / dense / (k / e))


# ----------------------------------------------------------------------------- against transformers
_converted: dict[str, tuple] = {}


def _convert(name, tmp_path_factory):
    if name not in _converted:
        folder = tmp_path_factory.mktemp(name)
        model = save_hf_model(name, folder / "hf")
        convert(str(folder / "hf"), folder / "ckpt")
        _converted[name] = (folder, model, load_checkpoint(folder / "ckpt"))
    return _converted[name]


# "qwen3-moe-mixed": dense MLPs in layers 0 and 2 (HF's mlp_only_layers), experts in 1 and 3.
@pytest.fixture(params=["qwen3-moe", "qwen3-moe-tied", "qwen3-moe-mixed"])
def converted(request, tmp_path_factory):
    return _convert(request.param, tmp_path_factory)


@pytest.fixture(params=["qwen3-moe", "qwen3-moe-tied"])
def converted_uniform(request, tmp_path_factory):
    """The models whose layers are all sparse: one stack, which the training forward may scan."""
    return _convert(request.param, tmp_path_factory)


def test_logits_and_left_padding_match_hf(converted):
    _, model, ckpt = converted
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (3, 37))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(transformer.logits(ckpt.params, ckpt.cfg, tokens)) - ref).max() <= TOL
    # Left padding: each row's real tokens give its unpadded logits.
    lengths, width = [11, 7, 3], 11
    padded = np.zeros((3, width), np.int32)
    positions = np.zeros((3, width), np.int32)
    valid = np.zeros((3, width), bool)
    for i, n in enumerate(lengths):
        padded[i, width - n :] = tokens[i, :n]
        positions[i, width - n :] = np.arange(n)
        valid[i, width - n :] = True
    out = np.asarray(transformer.logits(ckpt.params, ckpt.cfg, padded, positions, valid=valid))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(out[i, width - n :], ref[i, :n], atol=TOL, rtol=0)


@pytest.mark.parametrize("cpu_decode", [False, True], ids=["stacked", "out-major"])
def test_cached_prefill_and_decode_match_full_forward(converted, cpu_decode):
    _, model, ckpt = converted
    cfg = ckpt.cfg
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 20))
    full = np.asarray(transformer.logits(ckpt.params, cfg, tokens))
    cache = init_cache(cfg, 2, 32, per_layer=cpu_decode)
    pos = np.broadcast_to(np.arange(12), (2, 12))
    hidden, cache = transformer.forward(ckpt.params, cfg, tokens[:, :12], pos, cache=cache)
    steps = [np.asarray(transformer.logits_from_hidden(ckpt.params, hidden))]
    params = transformer.out_major_layers(ckpt.params, cfg) if cpu_decode else ckpt.params
    for t in range(12, 20):
        hidden, cache = transformer.forward(
            params, cfg, tokens[:, t : t + 1], np.full((2, 1), t), cache=cache
        )
        steps.append(np.asarray(transformer.logits_from_hidden(params, hidden, head_first=cpu_decode)))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=TOL, rtol=0)


def _sharp_hf_model(seed: int = 5, **changes):
    """A random Qwen3-MoE whose logits are far from ties (initializer 0.2), for greedy decoding."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(**{
        **dict(
            vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=20, moe_intermediate_size=36, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=256, initializer_range=0.2,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        ),
        **changes,
    })  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval().to(torch.float32)
    return model, registry.from_hf_config(cfg.to_dict())


@pytest.mark.parametrize(
    "changes", [{}, {"num_hidden_layers": 3, "decoder_sparse_step": 2}], ids=["sparse", "mixed"]
)
def test_greedy_decode_matches_hf_generate_for_32_tokens(changes):
    model, cfg = _sharp_hf_model(**changes)
    params = params_from_hf(cfg, checkpoint_tensors(model))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (1, 5, 13, 30)]
    ours = generate(params, cfg, prompts, Greedy(), max_new_tokens=32)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        assert got.ids == out[0, len(prompt) :].tolist()


def _grpo_batch(vocab: int, b: int = 3):
    """b rows of 13 tokens, some left-padded, completions from column 6."""
    rng = np.random.default_rng(6)
    t, start = 13, 6
    tokens = rng.integers(1, vocab, (b, t))
    valid = np.ones((b, t), bool)
    valid[1, :2] = valid[2, :4] = False
    tokens[~valid] = 0
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    completion = np.zeros((b, t), bool)
    completion[:, start:] = True
    advantages = rng.standard_normal(b).astype(np.float32)
    return Batch(
        tokens=jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(positions, jnp.int32),
        valid=jnp.asarray(valid), completion=jnp.asarray(completion), advantages=jnp.asarray(advantages),
        completion_start=start,
    )  # fmt: skip


def _torch_forward(model, batch):
    return model(
        torch.tensor(np.asarray(batch.tokens)),
        attention_mask=torch.tensor(np.asarray(batch.valid), dtype=torch.long),
        position_ids=torch.tensor(np.asarray(batch.positions)),
        output_router_logits=True,
    )


def test_router_aux_loss_is_hfs(converted):
    _, model, ckpt = converted
    batch = _grpo_batch(model.config.vocab_size)
    with torch.no_grad():
        ref = float(_torch_forward(model, batch).aux_loss)
    _, _, aux = transformer.forward(
        ckpt.params, ckpt.cfg, batch.tokens, batch.positions, valid=batch.valid, with_aux=True
    )
    np.testing.assert_allclose(float(moe.load_balancing_loss(aux)), ref, rtol=1e-5)


def test_training_step_gradient_matches_torch_autograd(converted):
    """One update's gradient (the GRPO loss at epoch 0 plus router_aux_coef x the load-balancing loss)
    equals torch autograd of the same loss on the HF model, parameter by parameter."""
    _, model, ckpt = converted
    cfg, coef, temperature = ckpt.cfg, 0.5, 0.7
    batch = _grpo_batch(model.config.vocab_size)
    trainer = Trainer(
        cfg, TrainConfig(loss=LossConfig(beta=0.0), temperature=temperature, router_aux_coef=coef)
    )
    grads, metrics, _ = trainer.grads(ckpt.params, batch)

    model.zero_grad()
    out = _torch_forward(model, batch)
    logp = torch.log_softmax(out.logits[:, :-1] / temperature, dim=-1)
    tokens = torch.tensor(np.asarray(batch.tokens))
    logp = logp.gather(-1, tokens[:, 1:, None])[..., 0][:, batch.completion_start - 1 :]
    adv = torch.tensor(np.asarray(batch.advantages))[:, None]
    ratio = torch.exp(logp - logp.detach())  # epoch 0: old = the current policy
    policy = -(ratio * adv).sum() / logp.numel()  # token aggregation; every completion token counts
    (policy + coef * out.aux_loss).backward()
    aux, loss = float(out.aux_loss.detach()), float((policy + coef * out.aux_loss).detach())
    np.testing.assert_allclose(float(metrics["router_aux"]), aux, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)

    ref = params_from_hf(cfg, checkpoint_tensors(model, {n: p.grad for n, p in model.named_parameters()}))
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = np.asarray(flat_ref[path])
        assert np.abs(np.asarray(g) - r).max() <= TOL * max(1.0, np.abs(r).max()), jax.tree_util.keystr(path)


@pytest.mark.parametrize("remat", ["nothing_saveable", "dots_saveable"])
def test_remat_and_scanned_layers_give_the_same_gradient(converted_uniform, remat):
    """The experts' custom VJP (and its loop) under jax.checkpoint inside the scan over the layers."""
    _, model, ckpt = converted_uniform
    batch = _grpo_batch(model.config.vocab_size)
    cfg = TrainConfig(loss=LossConfig(beta=0.0), router_aux_coef=0.5)
    plain, _, _ = Trainer(ckpt.cfg, cfg).grads(ckpt.params, batch)
    for variant in (dict(remat=remat), dict(layer_loop="scan")):
        trainer = Trainer(ckpt.cfg, TrainConfig(loss=LossConfig(beta=0.0), router_aux_coef=0.5, **variant))
        grads, _, _ = trainer.grads(ckpt.params, batch)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_export_round_trip_is_exact(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, model, _ = converted
    result = CliRunner().invoke(app, ["export", str(folder / "ckpt"), "-o", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    original, exported = model.state_dict(), back.state_dict()
    assert original.keys() == exported.keys()
    for name in original:
        assert torch.equal(original[name], exported[name]), name


def test_convert_streams_one_expert_tensor_at_a_time(converted):
    """The loader reads each per-expert tensor once, in the order the source gives, into its slice."""
    folder, model, ckpt = converted
    tensors = checkpoint_tensors(model)
    loads: list[str] = []

    class Source:
        def tensor_names(self):
            return list(tensors)

        def tensor_shape(self, name):
            return tuple(tensors[name].shape)

        def load(self, name):
            loads.append(name)
            return tensors[name].numpy()

    params = params_from_hf(ckpt.cfg, Source())
    assert sorted(loads) == sorted(tensors) and len(loads) == len(set(loads))
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in loads
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ckpt.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- sharded
@pytest.mark.parametrize("mixed", [False, True], ids=["sparse", "mixed"])
def test_training_on_an_expert_mesh_equals_one_device(mixed):
    """One update on 8 fake devices, experts over `expert=4` and everything over `fsdp=2`, equals the
    one-device update (gradients, metrics and the new parameters); mixed: a dense MLP in layer 1 of 3."""
    layout = {"num_layers": 3, "mlp_only_layers": (1,)} if mixed else {}
    cfg = models.tiny(
        "qwen3_moe", num_heads=8, num_kv_heads=4, vocab_size=256, hidden_size=64, num_experts=8,
        moe_intermediate_size=32, **layout,
    )  # fmt: skip
    params = transformer.init_params(cfg, jax.random.key(0))
    batch = _grpo_batch(cfg.vocab_size, b=8)  # split over fsdp x expert
    tcfg = TrainConfig(loss=LossConfig(beta=0.0), optim=OptimConfig(total_updates=4), router_aux_coef=0.1)
    one = Trainer(cfg, tcfg)
    state1, m1, _ = one.update(one.init_state(params, jax.random.PRNGKey(1)), batch)
    mesh = make_mesh("data=1,fsdp=2,expert=4")
    sharded = shard_params(params, cfg, mesh)
    experts = sharded["moe_layers" if mixed else "layers"]["experts_gate"]
    assert experts.shape[0] == 2 and experts.sharding.spec[:3] == (None, "expert", "fsdp")
    if mixed:
        assert sharded["mlp_layers"]["gate"].shape[0] == 1 and "gate" not in sharded["layers"]
    many = Trainer(cfg, tcfg, mesh=mesh)
    state8, m8, _ = many.update(many.init_state(sharded, jax.random.PRNGKey(1)), place_rows(batch, mesh))
    for key in m1:
        np.testing.assert_allclose(float(m8[key]), float(m1[key]), rtol=1e-5, atol=1e-7, err_msg=key)
    for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- refusals
def _hf_config(**changes):
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 128,
        "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 6,
        "num_key_value_heads": 2, "head_dim": 20, "moe_intermediate_size": 36, "num_experts": 5,
        "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
    }  # fmt: skip
    return {**cfg, **changes}


@pytest.mark.parametrize(
    "changes",
    [
        {"decoder_sparse_step": 2},
        {"num_hidden_layers": 4, "mlp_only_layers": [1, 2]},
        {"num_hidden_layers": 7, "decoder_sparse_step": 3, "mlp_only_layers": [5]},
        {"num_hidden_layers": 5, "decoder_sparse_step": 1},
    ],
)
def test_sparse_layers_are_hfs(changes):
    """Which layers have the experts, and the stacks that hold them, as HF builds the model."""
    import transformers

    hf = _hf_config(**changes)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**hf))
    want = tuple(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in model.model.layers)
    cfg = registry.from_hf_config(hf)
    assert cfg.sparse_layers == want
    stacks = cfg.layer_stacks()
    specs = cfg.param_specs()
    if all(want):
        assert stacks == {} and "experts_gate" in specs["layers"]
    else:
        assert stacks["moe_layers"] == tuple(i for i, s in enumerate(want) if s)
        assert stacks["mlp_layers"] == tuple(i for i, s in enumerate(want) if not s)
        assert specs["moe_layers"]["experts_gate"].shape[0] == sum(want)
        assert specs["mlp_layers"]["gate"].shape == (len(want) - sum(want), 48, 80)
        assert "experts_gate" not in specs["layers"] and "gate" not in specs["layers"]


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"mlp_only_layers": [0, 1]}, "no layer has experts"),
        ({"decoder_sparse_step": 3}, "no layer has experts"),
        ({"mlp_only_layers": [2]}, "mlp_only_layers names layer 2, but the model has layers 0-1"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step must be a positive integer"),
        ({"mlp_only_layers": ["0"]}, "mlp_only_layers must be a list of layer numbers"),
        ({"scoring_func": "sigmoid"}, "scoring_func='sigmoid'"),
        ({"n_shared_experts": 1}, "n_shared_experts=1"),
        ({"num_experts_per_tok": 6}, "exceeds num_experts"),
        ({"num_experts": 0, "num_local_experts": None}, "num_experts must be a positive integer"),
    ],
)
def test_unsupported_configs_are_refused(changes, fragment):
    with pytest.raises(UnsupportedModelError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        registry.from_hf_config(_hf_config(**changes))


def test_unsupported_router_is_one_line_exit_2_and_writes_nothing(converted, tmp_path):
    folder, _, _ = converted
    src = tmp_path / "hf"
    src.mkdir()
    for f in (folder / "hf").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "scoring_func": "sigmoid"}))
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "ck")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "scoring_func='sigmoid' is not supported" in lines[0] and "softmax" in lines[0]
    assert not (tmp_path / "ck").exists()
