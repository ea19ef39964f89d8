"""Parity with the ORIGINAL stage-1 training code: its pre-training checkpoint is regenerated, converted into
`M2D2ForPreTraining`, and the recorded batch is replayed with the recorded mask — losses, predictions, targets,
CLAP embeddings, gradients, one clipped AdamW step, the EMA update and the temperature clamp."""

import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForPreTraining

from m2d2_hf import M2D2AudioModel, M2D2FeatureExtractor, M2D2ForPreTraining
from m2d2_hf.conversion import (
    CLAP_RULES,
    ENCODER_RULES,
    PREDICTOR_RULES,
    SEMANTIC_PROJECTOR_RULES,
    TARGET_RULES,
    convert_checkpoint,
)
from m2d2_hf.training.optim import weight_decay_groups

from .conftest import SHARED_DIR, generate_checkpoint, load_npz, return_freed_memory


pytestmark = pytest.mark.slow

PRETRAIN_DIR = SHARED_DIR / "fixtures" / "original_m2d2_pretrain"
RULES = [(p, f"audio_model.{t}") for p, t in ENCODER_RULES] + TARGET_RULES + PREDICTOR_RULES
RULES += SEMANTIC_PROJECTOR_RULES + CLAP_RULES


def converted_name(original_key: str) -> str | None:
    for pattern, target in RULES:
        if re.fullmatch(pattern, original_key):
            return re.sub(f"^{pattern}$", target, original_key)
    return None


@pytest.fixture(scope="module")
def reference() -> dict:
    return load_npz(PRETRAIN_DIR / "reference_stage1.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    checkpoint = generate_checkpoint(PRETRAIN_DIR / "make_pretrain_checkpoint.py", tmp_path_factory.mktemp("original"))
    return convert_checkpoint(checkpoint, tmp_path_factory.mktemp("pretrain_converted"), pretraining=True)


@pytest.fixture(scope="module")
def replay(converted, reference, tmp_path_factory):
    """Forward on the recorded batch and mask, then the recipe's step: clip 3.0, AdamW, EMA, clamp."""
    return_freed_memory()  # the full-size models that the conversion test loaded
    model = AutoModelForPreTraining.from_pretrained(converted).train()
    assert isinstance(model, M2D2ForPreTraining)
    batch = {
        "input_features": torch.from_numpy(reference["x"])[:, 0],
        "caption_embeddings": torch.from_numpy(reference["text_embs_in"]),
        "visible_indices": torch.from_numpy(reference["visible_idx"]),
    }
    out = model(**batch)
    out.loss.backward()
    parameters = dict(model.named_parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float(reference["step_clip_grad"]))
    # The reference records per-tensor sums only: keeping those (in float64), not float64 copies of every gradient
    # and of the state before and after the step, and the state before the step on disk (float32: exact; read back
    # a tensor at a time), hold the replay of the full-size model to about 3 GB.
    grads = {name: _sums(p.grad) for name, p in parameters.items() if p.grad is not None}
    before_file = tmp_path_factory.mktemp("before") / "before.safetensors"
    save_file({name: t.detach().contiguous() for name, t in model.state_dict().items()}, before_file)
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, float(reference["step_weight_decay"])),
        lr=float(reference["step_lr"][0]),  # per group; both groups share it
        betas=tuple(reference["step_betas"]),
        eps=float(reference["step_eps"]),
    )
    optimizer.step()
    optimizer.zero_grad()
    groups = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    del optimizer  # its moments are as large as the trainable weights twice over
    decay = model.ema_decay(step=0, total_steps=1000)
    model.update_target(decay)
    model.clamp_logit_scale()
    steps = {}
    with safe_open(before_file, "pt") as before:
        for name, tensor in model.state_dict().items():
            after = tensor.detach().double()
            delta = after - before.get_tensor(name).double()
            steps[name] = {
                "delta_sum": delta.sum().item(),
                "delta_abs": delta.abs().sum().item(),
                "after": after.sum().item(),
            }
    with torch.no_grad():
        out_after = model(**batch)
    return {
        "model": model,
        "out": out,
        "out_after": out_after,
        "grad_norm": grad_norm,
        "grads": grads,
        "steps": steps,
        "decay": decay,
        "groups": groups,
        "parameters": parameters,
    }


def _sums(tensor: torch.Tensor) -> tuple[float, float]:
    """(sum, sum of squares) of a tensor, in float64."""
    values = tensor.detach().double()
    return values.sum().item(), (values**2).sum().item()


def test_conversion_keeps_every_tensor(converted, reference, replay):
    # The replayed model is the converted one after a step: which tensors it has and trains is as converted (one
    # full-size model in memory, not a second copy).
    model = replay["model"]
    assert isinstance(model, M2D2ForPreTraining)
    names = [converted_name(key) for key in reference["ck_keys"]]
    assert [k for k, n in zip(reference["ck_keys"], names) if n is None] == ["norm_stats"]
    assert M2D2FeatureExtractor.from_pretrained(converted).norm_stats == pytest.approx(
        reference["norm_stats"].tolist()
    )
    assert not any(p.requires_grad for p, _ in model.target_parameter_pairs())
    # The online encoder exports as a plain audio model: its weights are the folder's.
    encoder = M2D2AudioModel.from_pretrained(converted)
    with safe_open(converted / "model.safetensors", "pt") as weights:
        stored = weights.get_tensor("audio_model.layers.3.mlp.fc1.weight")
    assert torch.equal(encoder.layers[3].mlp.fc1.weight, stored.to(encoder.dtype))


def test_forward_matches_the_original(replay, reference):
    out = replay["out"]
    assert torch.equal(out.masked_indices, torch.from_numpy(reference["masked_idx"]))
    for name, key in (("loss", "loss_total"), ("m2d_loss", "loss_m2d"), ("clap_loss", "loss_clap")):
        assert abs(getattr(out, name).item() - float(reference[key])) <= 1e-5, name
    np.testing.assert_allclose(out.predictions.detach().numpy(), reference["pred"], atol=1e-4)
    np.testing.assert_allclose(out.audio_embeds.detach().numpy(), reference["audio_emb"], atol=1e-4)
    np.testing.assert_allclose(out.text_embeds.detach().numpy(), reference["text_emb"], atol=1e-4)
    target = torch.from_numpy(reference["target"])
    standardised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    np.testing.assert_allclose(out.targets.detach().numpy(), standardised.numpy(), atol=1e-4)


def test_gradients_match_the_original(replay, reference):
    assert abs(float(replay["grad_norm"]) - float(reference["grad_total_norm_preclip"])) <= 1e-4 * float(
        reference["grad_total_norm_preclip"]
    )
    for key, (grad_sum, grad_squares) in zip(reference["ck_keys"], reference["ck_grad"]):
        name = converted_name(key)
        if np.isnan(grad_sum):
            assert name not in replay["grads"], key
            continue
        found_sum, found_squares = replay["grads"][name]
        assert abs(found_squares - grad_squares) <= 1e-3 * grad_squares, key
        assert abs(found_sum - grad_sum) <= 1e-3 * np.sqrt(grad_squares), key


def test_optimiser_step_ema_and_clamp_match_the_original(replay, reference):
    assert replay["decay"] == pytest.approx(float(reference["step_tau"]))
    for i, key in enumerate(reference["ck_keys"]):
        name = converted_name(key)
        if name is None:
            continue
        parameter = replay["parameters"].get(name)
        expected_decay = reference["ck_weight_decay"][i]
        if parameter is not None and parameter.requires_grad:
            assert replay["groups"][id(parameter)] == expected_decay, key
        else:
            assert np.isnan(expected_decay), key
        step = replay["steps"][name]
        delta_sum, delta_squares, delta_abs = reference["ck_delta"][i]
        assert abs(step["delta_sum"] - delta_sum) <= 1e-3 * max(delta_abs, 1e-12), key
        assert abs(step["delta_abs"] - delta_abs) <= 1e-3 * max(delta_abs, 1e-12), key
        assert abs(step["after"] - reference["ck_post"][i][0]) <= 1e-5 * max(1.0, abs(reference["ck_post"][i][0])), key
    model = replay["model"]
    assert abs(model.logit_scale.item() - float(reference["logit_scale_after"])) <= 1e-6
    tracked = {
        "blocks_0_attn_qkv_weight": model.audio_model.layers[0].attention.qkv.weight,
        "target_blocks_0_attn_qkv_weight": model.target_layers[0].attention.qkv.weight,
        "decoder_embed_weight": model.predictor.decoder_embed.weight,
        "audio_proj_sem_token": model.audio_projection.sem_token,
    }
    for name, tensor in tracked.items():
        values = tensor.detach().flatten()[torch.from_numpy(reference[f"tr_{name}_idx"])].numpy()
        np.testing.assert_allclose(values, reference[f"tr_{name}_post_elems"], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(
        model.audio_projection.sem_token.detach().numpy(), reference["audio_proj_sem_token_post"], atol=2e-4
    )


def test_forward_after_the_step(replay, reference):
    out = replay["out_after"]
    for name, key in (("loss", "loss_total_after"), ("m2d_loss", "loss_m2d_after"), ("clap_loss", "loss_clap_after")):
        assert abs(getattr(out, name).item() - float(reference[key])) <= 1e-4, name
