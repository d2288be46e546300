"""`mllmjax train` on a LLaVA checkpoint with image rollouts (the tiny LLaVAs of test_vision_sample): one
update's gradient equals torch autograd of the same GRPO loss on HF's LlavaForConditionalGeneration
and Gemma3ForConditionalGeneration;
the frozen tower stays bit for bit (and trains with --train-vision); rollout -> score -> train ->
sample/export works on the checkpoint it writes; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import IMAGE_TOKEN, checkpoint_tensors, make_llava, make_llava_processor
from PIL import Image
from test_vision_rollout import count_rollout, text_ckpt  # noqa: F401  (fixtures, reused)
from test_vision_sample import (  # noqa: F401  (converted: the fixture, reused)
    _expect_bad,
    converted,
    hf_greedy,
    hf_inputs,
    run,
    stop_ids,
    until_stop,
    write_image,
)

from mllmjax.checkpoint import load_checkpoint
from mllmjax.errors import BadInputError
from mllmjax.loss import LossConfig
from mllmjax.models.registry import model_config_from_hf
from mllmjax.models.vision import vlm
from mllmjax.records import read_records, write_records
from mllmjax.trainer import Batch, TrainConfig
from mllmjax.vision_training import VisionTrainer, split_trainable, trained_parts

TOL = 1e-4


def _grpo_batch(root: Path) -> tuple[Batch, dict]:
    """Rows with an image, another image, the first again, and none, their prompts (made by the
    checkpoint's processor) left-padded, completions of several lengths (never the image token) after
    them; and HF's inputs of the same rows."""
    rng = np.random.default_rng(3)
    rows = [hf_inputs(root, q, imgs) for q, imgs in
            (("w1 w2", ["a.png"]), ("w3 w4 w5", ["b.png"]), ("w6", ["a.png"]), ("w7 w8", []))]  # fmt: skip
    prompts = [x["input_ids"][0].numpy() for x in rows]
    p = max(len(x) for x in prompts)
    lengths = [5, 2, 6, 4]
    t = p + max(lengths)
    tokens, valid = np.zeros((4, t), np.int32), np.zeros((4, t), bool)
    for i, (ids, c) in enumerate(zip(prompts, lengths, strict=True)):
        tokens[i, p - len(ids) : p] = ids
        tokens[i, p : p + c] = rng.integers(1, IMAGE_TOKEN, c)
        valid[i, p - len(ids) : p + c] = True
    completion = valid & (np.arange(t) >= p)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    pixels = np.zeros((4, 1, *rows[0]["pixel_values"].shape[1:]), np.float32)
    for i, x in enumerate(rows[:3]):
        pixels[i] = x["pixel_values"].numpy()
    batch = Batch(
        tokens=jnp.asarray(tokens), positions=jnp.asarray(positions), valid=jnp.asarray(valid),
        completion=jnp.asarray(completion), advantages=jnp.asarray(rng.standard_normal(4), jnp.float32),
        pixels=jnp.asarray(pixels), completion_start=p,
    )  # fmt: skip
    hf = dict(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(valid, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
        pixel_values=torch.cat([x["pixel_values"] for x in rows[:3]]),
    )
    if "token_type_ids" in rows[0]:  # Gemma 3: the prompt's image tokens, which see their whole image
        hf["token_type_ids"] = torch.tensor(tokens == IMAGE_TOKEN, dtype=torch.long)
    return batch, hf


@pytest.fixture(scope="module", params=["clip-llama", "siglip-gemma3"])
def unscaled(request, tmp_path_factory) -> tuple[torch.nn.Module, Path, object, dict]:
    """(a tiny vision-language model at HF's initial scale, a folder with its processor in ck/ and the
    images a.png, b.png, its config and params as the loader reads them). Not `converted`'s scaled-up
    weights: at those, float32 torch's own tower gradients are 3e-4 from float64's, and a comparison at
    1e-4 would measure rounding, not the math. One LLaVA: what training adds (the per-row merge, the
    frozen tower's features) is the same code for every tower and strategy, whose forward
    test_vision_sample checks against HF on both; and Gemma 3, whose projector pools and whose image
    tokens see their whole image in training too."""
    root = tmp_path_factory.mktemp("unscaled")
    model = make_llava(request.param)
    make_llava_processor(model).save_pretrained(root / "ck")
    write_image(root / "a.png", 0)
    write_image(root / "b.png", 1, (33, 17))
    cfg = model_config_from_hf(model.config.to_dict())
    return model, root, cfg, vlm.module(cfg).params_from_hf(cfg, checkpoint_tensors(model))


def _torch_grads(model, model_cfg, batch: Batch, hf: dict, temperature: float) -> tuple[torch.Tensor, dict]:
    """(the GRPO loss at epoch 0, token aggregation, on HF's model; its gradient in our params' layout)."""
    model.zero_grad()
    logits = model(**hf).logits
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    tokens = hf["input_ids"]
    start = batch.completion_start
    logp = logp.gather(-1, tokens[:, 1:, None])[..., 0][:, start - 1 :]
    mask = torch.tensor(np.asarray(batch.completion)[:, start:], dtype=torch.float32)
    adv = torch.tensor(np.asarray(batch.advantages))[:, None]
    ratio = torch.exp(logp - logp.detach())
    loss = -(ratio * adv * mask).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss, vlm.module(model_cfg).params_from_hf(model_cfg, checkpoint_tensors(model, grads))


def test_training_step_gradient_matches_torch_autograd(unscaled):
    """The GRPO loss at epoch 0 (ratio 1, token aggregation, temperature 0.7): the gradient of every
    part with --train-vision, and of the projector and language model with the tower frozen (its
    features computed once, outside the gradient), equal torch autograd on the HF model."""
    model, root, model_cfg, params = unscaled
    batch, hf = _grpo_batch(root)
    temperature = 0.7
    loss, ref = _torch_grads(model, model_cfg, batch, hf, temperature)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))

    def check(got) -> None:
        for path, g in jax.tree_util.tree_leaves_with_path(got):
            g, r, name = np.asarray(g), np.asarray(flat_ref[path]), jax.tree_util.keystr(path)
            if name == "['vision']['layers']['k_bias']":
                # Exactly 0: the tower's attention (no rope) softmaxes q.(k + b) over the keys, the same
                # q.b for every key. Both sides are rounding noise, far below the tower's gradients.
                scale = max(np.abs(x).max() for x in jax.tree.leaves(ref["vision"]))
                assert max(np.abs(g).max(), np.abs(r).max()) <= 1e-5 * scale, name
                continue
            err = np.abs(g - r).max()
            assert err <= TOL * np.abs(r).max(), (name, err)

    everything = TrainConfig(loss=LossConfig(beta=0.0), temperature=temperature, train_vision=True)
    trainer = VisionTrainer(model_cfg, everything, frozen={})
    got, metrics, _ = trainer.grads(params, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss.detach()), rtol=1e-5)
    assert set(got) == {"vision", "projector", "text"}
    assert np.abs(np.asarray(got["vision"]["patch"])).max() > 0  # the tower is trained through
    check(got)

    frozen_tower = TrainConfig(loss=LossConfig(beta=0.0), temperature=temperature)
    assert trained_parts(frozen_tower) == ("projector", "text")
    trained, frozen = split_trainable(params, trained_parts(frozen_tower))
    trainer = VisionTrainer(model_cfg, frozen_tower, frozen=frozen)
    prepared = trainer.prepare(batch)  # what training does: the tower's output once, then no pixels
    assert prepared.pixels is None and prepared.image_features is not None
    got, _, _ = trainer.grads(trained, prepared)
    assert set(got) == {"projector", "text"}
    check(got)


def test_lora_gradient_is_the_chain_rule_of_torchs(unscaled):
    """--lora-rank on a vision-language model: the adapters sit on its language model, the tower and
    projector frozen. W' = W + s a b with fresh b = 0, so dL/db = s a^T dL/dW (torch autograd's dL/dW
    on the HF model) and dL/da = 0."""
    from mllmjax import lora
    from mllmjax.lora import LoraConfig

    model, root, model_cfg, params = unscaled
    batch, hf = _grpo_batch(root)
    _, ref = _torch_grads(model, model_cfg, batch, hf, 1.0)
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    config = TrainConfig(loss=LossConfig(beta=0.0), temperature=1.0, lora=lcfg)
    assert trained_parts(config) == ()
    trainer = VisionTrainer(model_cfg, config, frozen=params)
    adapters = lora.init_adapters(model_cfg.text, lcfg, jax.random.key(0))
    got, _, _ = trainer.grads(adapters, batch)
    assert set(got["layers"]) == {"q", "v", "down"}
    for name, g in got["layers"].items():
        a, w = np.asarray(adapters["layers"][name]["a"], np.float64), np.asarray(ref["text"]["layers"][name], np.float64)
        layers, rank = a.shape[0], a.shape[-1]
        rows = a.reshape(layers, -1, rank)
        want = lcfg.scale * np.einsum("lir,lio->lro", rows, w.reshape(layers, rows.shape[1], -1))
        want = want.reshape(np.shape(g["b"]))
        assert np.abs(np.asarray(g["b"]) - want).max() <= TOL * np.abs(want).max(), name
        assert np.abs(np.asarray(g["a"])).max() == 0.0, name
    with pytest.raises(BadInputError, match="--train-vision"):
        VisionTrainer(model_cfg, dataclasses.replace(config, train_vision=True), frozen=params)


@pytest.mark.parametrize("unscaled", ["siglip-gemma3"], indirect=True)  # LLaVA's prompt is causal text
def test_rows_sharing_a_prompt_with_an_image_equal_the_per_row_forward(unscaled):
    """--shared-prompt runs a group's prompt (its image tokens, which on Gemma 3 see their whole image)
    once: the log-probs and gradient equal the per-row forward's."""
    _, root, model_cfg, params = unscaled
    ids = hf_inputs(root, "w1 w2", ["a.png"])
    prompt, pixels = ids["input_ids"][0].numpy(), ids["pixel_values"].numpy()
    p, c = len(prompt), 5
    rng = np.random.default_rng(4)
    tokens = np.concatenate([np.tile(prompt, (2, 1)), rng.integers(1, IMAGE_TOKEN, (2, c))], axis=1)
    valid = np.ones(tokens.shape, bool)
    valid[1, -2:] = False  # completions of two lengths
    batch = Batch(
        tokens=jnp.asarray(tokens, jnp.int32),
        positions=jnp.asarray(np.broadcast_to(np.arange(p + c), tokens.shape), jnp.int32),
        valid=jnp.asarray(valid),
        completion=jnp.asarray(valid & (np.arange(p + c) >= p)),
        advantages=jnp.asarray([0.5, -1.0], jnp.float32),
        pixels=jnp.asarray(np.stack([pixels, pixels])),
        completion_start=p,
        prompt_rows=2,
    )
    config = TrainConfig(loss=LossConfig(beta=0.0), train_vision=True)
    shared = VisionTrainer(model_cfg, config, frozen={})
    rows = VisionTrainer(model_cfg, dataclasses.replace(config, shared_prompt=False), frozen={})
    want, got = np.asarray(rows.logprobs(params, batch)), np.asarray(shared.logprobs(params, batch))
    assert np.abs(got - want).max() <= 1e-5 and (got[:, p:][valid[:, p:]] < 0).all()
    g_shared, _, _ = shared.grads(params, batch)
    g_rows, _, _ = rows.grads(params, batch)
    vision = max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(g_rows["vision"]))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g_shared), jax.tree.leaves(g_rows), strict=True):
        name = jax.tree_util.keystr(path)
        # the tower's k_bias: exactly 0 in the math, rounding noise on both sides (see above)
        scale = vision if name == "['vision']['layers']['k_bias']" else np.abs(np.asarray(y)).max()
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= 1e-5 * scale, name


# One epoch (one update program to compile), the schedule over two steps so that the resumed run's
# program is the first run's; the KL reference is kept (--beta 0.04) in the first run.
TRAIN = ("--ppo-epochs", 1, "--steps", 2, "--lr", "1e-3", "--seed", 1)


def _scored(rollouts: Path, out: Path) -> Path:
    """The rollouts scored (by `score`), with random advantages so that every row moves."""
    assert run("score", rollouts, "-o", out).exit_code == 0
    rng = np.random.default_rng(0)
    records = [dataclasses.replace(r, advantage=float(rng.normal())) for r in read_records(out)]
    write_records(records, out, force=True)
    return out


def _params(path: Path) -> dict:
    return jax.tree.map(np.asarray, load_checkpoint(path, vision_language=True).params)


def _changed(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def trained(count_rollout, tmp_path_factory):  # noqa: F811
    """(the checkpoint folder, the scored records, ck1: `train` on them with the defaults)."""
    root, rollouts = count_rollout
    folder = tmp_path_factory.mktemp("train")
    scored = _scored(rollouts, folder / "s.jsonl")
    result = run("train", root / "ck", scored, "-o", folder / "ck1", *TRAIN)
    assert result.exit_code == 0, result.output
    return root, scored, folder / "ck1"


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_train_keeps_the_frozen_tower_bitwise_and_trains_it_with_train_vision(trained, tmp_path):
    root, scored, ck1 = trained
    start, after = _params(root / "ck"), _params(ck1)
    for part in vlm.PARTS:  # the language model and projector move; the frozen tower is the same bits
        assert _changed(start[part], after[part]) == (part != "vision"), part
    meta = json.loads((ck1 / "mllmjax.json").read_text())
    assert meta["family"] == "llava" and meta["trained"] == ["projector", "text"] and meta["step"] == 1
    history = [json.loads(x) for x in (ck1 / "train_metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    # the sampler's log-probs of the records are the trainer's (float32, the same model)
    assert history[0]["logp_mismatch_max"] < 1e-4

    args = (*TRAIN, "--beta", 0)
    result = run(
        "train", root / "ck", scored, "-o", tmp_path / "v", "--train-vision", "--no-train-projector", *args
    )
    assert result.exit_code == 0, result.output
    moved = _params(tmp_path / "v")
    assert _changed(start["vision"], moved["vision"]) and _changed(start["text"], moved["text"])
    assert not _changed(start["projector"], moved["projector"])
    # --resume continues the optimizer state of the same parts, and refuses others
    result = run("train", ck1, scored, "-o", tmp_path / "r", "--resume", "--train-vision", *TRAIN)
    _expect_bad(result, "trained the projector, text", "--resume trains the same parts")
    result = run("train", ck1, scored, "-o", tmp_path / "r", "--resume", *TRAIN)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "r" / "mllmjax.json").read_text())
    assert meta["step"] == 2 and meta["updates"] == 2 and meta["reference"] == str(root / "ck")
    assert _changed(after["text"], _params(tmp_path / "r")["text"])


def _hf_inputs(hf_dir: Path, question: str, image: Path) -> dict:
    """HF's model inputs of a one-picture chat prompt, made by the processor of the export at hf_dir."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(hf_dir)
    content = [{"type": "image"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    return processor(text=text, images=[Image.open(image)], return_tensors="pt", add_special_tokens=False)


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_the_trained_checkpoint_samples_and_exports_as_a_llava(trained, tmp_path):
    """sample --image on the new checkpoint gives HF's greedy tokens of its export, which transformers
    loads with its processor."""
    import transformers

    root, _, ck1 = trained
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer.json"):
        assert (ck1 / name).is_file() == (root / "ck" / name).is_file(), name
    out = tmp_path / "out.jsonl"
    result = run("sample", ck1, "--image", root / "a.png", "w1 w2", "--greedy", "--max-new-tokens", 8,
                 "--json", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert run("export", ck1, "-o", tmp_path / "hf").exit_code == 0
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    inputs = _hf_inputs(tmp_path / "hf", "w1 w2", root / "a.png")
    assert record["prompt_ids"] == inputs["input_ids"][0].tolist()
    want = until_stop(hf_greedy(model.eval(), inputs)[0], stop_ids(root))[:8]
    assert record["completion_ids"] == want


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_lora_train_writes_adapters_that_sample_and_export_merged(trained, tmp_path):
    """--lora-rank on a vision-language checkpoint: OUT holds the language model's adapters on the base;
    read merged, the tower and projector are the base's bits and the language model moved; sample
    --image reads it and export writes the merged model, which transformers loads; export --adapter
    writes a PEFT folder that, on the base's HF export, gives the merged model's logits with an image
    and puts adapters on the language model's modules only."""
    import transformers
    from peft import PeftModel

    root, scored, _ = trained
    out = tmp_path / "lora"
    result = run("train", root / "ck", scored, "-o", out, "--lora-rank", 4, "--lora-alpha", 8, *TRAIN)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "mllmjax.json").read_text())
    assert meta["family"] == "llava" and meta["lora"]["base"] == str((root / "ck").absolute())
    adapters = load_checkpoint(out, vision_language=True, adapters=True).params
    assert set(adapters) == {"layers"} and set(adapters["layers"]) == set(meta["lora"]["targets"])
    base, merged = _params(root / "ck"), _params(out)
    for part in ("vision", "projector"):
        assert not _changed(base[part], merged[part]), part
    assert _changed(base["text"], merged["text"])
    result = run("sample", out, "--image", root / "a.png", "w1 w2", "--greedy", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    assert run("export", out, "-o", tmp_path / "hf").exit_code == 0
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    q = model.state_dict()["model.language_model.layers.0.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(q, merged["text"]["layers"]["q"][0].reshape(q.shape[1], -1).T)

    assert run("export", root / "ck", "-o", tmp_path / "base").exit_code == 0
    assert run("export", out, "-o", tmp_path / "peft", "--adapter").exit_code == 0
    base = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()  # (the adapters go into `base`)
    adapted = [n for n, _ in peft.named_modules() if n.endswith(".lora_A.default")]
    assert len(adapted) == model.config.text_config.num_hidden_layers * len(meta["lora"]["targets"])
    assert all(n.startswith("base_model.model.model.language_model.layers.") for n in adapted), adapted
    inputs = _hf_inputs(tmp_path / "hf", "w1 w2 w3", root / "a.png")
    with torch.no_grad():
        got, ref = peft(**inputs).logits.numpy(), model.eval()(**inputs).logits.numpy()
        with peft.disable_adapter():
            before = peft(**inputs).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.abs(ref - before).max() > 1e-3  # the adapters count

    _expect_bad(run("train", root / "ck", scored, "-o", tmp_path / "x", "--lora-rank", 4, "--train-vision"),
                "--train-vision")  # fmt: skip
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_bad_records_are_one_line_and_write_nothing(trained, text_ckpt, tmp_path):  # noqa: F811
    root, scored, _ = trained
    # the records with copies of their pictures (never the fixture's own files), one copy then changed
    lines = [json.loads(x) for x in scored.read_text().splitlines()]
    (tmp_path / "pics").mkdir()
    for line in lines:
        for x in line["images"]:
            source = scored.parent / x["path"]  # (an absolute path stays itself)
            x["path"] = str(tmp_path / "pics" / source.name)
            Path(x["path"]).write_bytes(source.read_bytes())

    def write(name: str, rows: list[dict]) -> Path:
        (tmp_path / name).write_text("".join(json.dumps(x) + "\n" for x in rows))
        return tmp_path / name

    assert lines[0]["images"] != lines[-1]["images"]
    Image.new("RGB", (8, 8)).save(lines[-1]["images"][0]["path"])
    changed = write("changed.jsonl", lines)
    _expect_bad(run("train", root / "ck", changed, "-o", tmp_path / "t"), "has changed since it was sampled")
    # a prompt whose image tokens are not what its images fill
    ids = [i for i in lines[0]["prompt_ids"] if i != IMAGE_TOKEN][:-1] + [IMAGE_TOKEN]
    few = write("few.jsonl", [dict(lines[0], prompt_ids=ids)])
    _expect_bad(run("train", root / "ck", few, "-o", tmp_path / "t"), "holds 1 image tokens")
    # records with images on a text checkpoint
    _expect_bad(run("train", text_ckpt, scored, "-o", tmp_path / "t"), "holds images", "is a text model")
    assert not (tmp_path / "t").exists()
