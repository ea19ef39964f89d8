"""Stage-1 objective on a tiny config: masking, losses against a plain re-computation, EMA, temperature, schedules."""

import math

import pytest
import torch
import torch.nn.functional as F

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2ForPreTraining
from m2d2_hf.masking import random_unstructured_mask
from m2d2_hf.modeling_m2d2_pretraining import MAX_LOGIT_SCALE
from m2d2_hf.training.optim import scaled_learning_rate, warmup_cosine_schedule, weight_decay_groups

from .conftest import TINY_AUDIO


TINY_PRETRAIN = dict(
    TINY_AUDIO,
    predictor_hidden_size=16,
    predictor_num_hidden_layers=1,
    predictor_num_attention_heads=2,
    predictor_intermediate_size=32,
    caption_embedding_size=24,
    projector_intermediate_size=32,
)


def tiny_model(**overrides) -> M2D2ForPreTraining:
    torch.manual_seed(0)
    model = M2D2ForPreTraining(M2D2AudioConfig(**{**TINY_PRETRAIN, **overrides}))
    with torch.no_grad():  # a target that differs from the online encoder, as after some training
        for target, _ in model.target_parameter_pairs():
            target.add_(0.05 * torch.randn_like(target))
    return model


def test_random_mask_keeps_the_same_number_per_sample():
    generator = torch.Generator().manual_seed(3)
    visible, masked = random_unstructured_mask(4, 65, 0.7, torch.device("cpu"), generator)
    assert visible.shape == (4, int(65 * 0.3)) and masked.shape == (4, 65 - int(65 * 0.3))
    for v, m in zip(visible, masked):
        assert sorted(torch.cat([v, m]).tolist()) == list(range(65))
    again, _ = random_unstructured_mask(4, 65, 0.7, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert torch.equal(visible, again)


def plain_m2d_loss(model: M2D2ForPreTraining, features: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The objective written out sample by sample, from the spec (§6)."""
    losses = []
    patches = model.audio_model.embeddings(features)
    cls = model.audio_model.embeddings.cls_embedding()[0]
    for b in range(features.shape[0]):
        hidden_ids = [p for p in range(patches.shape[1]) if p not in set(visible[b].tolist())]
        target = torch.cat([cls, patches[b, hidden_ids]])[None]
        for layer in model.target_layers:
            target = layer(target)
        target = model.target_layernorm(target)[0, 1:]
        target = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, keepdim=True) + 1e-6)
        online = torch.cat([cls, patches[b, visible[b]]])[None]
        for layer in model.audio_model.layers:
            online = layer(online)
        online = model.audio_model.layernorm(online)
        prediction = model.predictor(online, visible[b : b + 1], torch.tensor([hidden_ids]))[0]
        for p, t in zip(prediction, target):
            losses.append(2 - 2 * torch.dot(p / p.norm(), t / t.norm()))
    return torch.stack(losses).mean()


def plain_clap_loss(audio: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    audio, text = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
    n = len(audio)
    total = 0.0
    for i in range(n):
        row = [scale * torch.dot(audio[i], text[j]) for j in range(n)]
        column = [scale * torch.dot(audio[j], text[i]) for j in range(n)]
        total = total - torch.log_softmax(torch.stack(row), 0)[i] - torch.log_softmax(torch.stack(column), 0)[i]
    return total / (2 * n)


def test_losses_equal_a_plain_computation():
    model = tiny_model().eval()
    features, captions = torch.randn(3, 80, 208), torch.randn(3, 24)
    visible, _ = random_unstructured_mask(3, 65, 0.7, torch.device("cpu"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(features, captions, visible_indices=visible)
        expected_m2d = plain_m2d_loss(model, features, visible)
        expected_clap = plain_clap_loss(out.audio_embeds, out.text_embeds, 1 / 0.07)
    torch.testing.assert_close(out.m2d_loss, expected_m2d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.clap_loss, expected_clap, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected_m2d + 0.01 * expected_clap, rtol=1e-5, atol=1e-5)
    # The CLAP audio side reads the visible tokens only.
    assert out.audio_embeds.shape == (3, 32) and out.visible_indices.shape == (3, 19)


def test_clips_without_captions_train_m2d_only():
    model = tiny_model().eval()
    features, captions = torch.randn(4, 80, 208), torch.randn(4, 24)
    visible, _ = random_unstructured_mask(4, 65, 0.7, torch.device("cpu"), torch.Generator().manual_seed(1))
    has_caption = torch.tensor([True, False, True, True])
    with torch.no_grad():
        out = model(features, captions, has_caption, visible_indices=visible)
        captions_changed = captions.clone()
        captions_changed[1] = 1e3  # the caption-less row must not matter
        changed = model(features, captions_changed, has_caption, visible_indices=visible)
    keep = has_caption.nonzero()[:, 0]
    expected = plain_clap_loss(out.audio_embeds[keep], out.text_embeds[keep], 1 / 0.07)
    torch.testing.assert_close(out.clap_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(changed.clap_loss, out.clap_loss)
    nobody = model.train()(features, captions, torch.zeros(4, dtype=torch.bool), visible_indices=visible)
    assert nobody.clap_loss.item() == 0.0
    nobody.loss.backward()  # still one graph, no crash
    plain = M2D2ForPreTraining(M2D2AudioConfig(**{**TINY_PRETRAIN, "caption_embedding_size": None}))
    assert plain(features).clap_loss is None and not hasattr(plain, "logit_scale")


def test_target_gets_no_gradient_and_follows_the_ema():
    model = tiny_model().train()
    out = model(torch.randn(2, 80, 208), torch.randn(2, 24))
    out.loss.backward()
    assert all(t.grad is None and not t.requires_grad for t, _ in model.target_parameter_pairs())
    assert all(o.grad is not None for _, o in model.target_parameter_pairs())
    before = [t.detach().clone() for t, _ in model.target_parameter_pairs()]
    with torch.no_grad():
        for _, online in model.target_parameter_pairs():
            online.add_(0.1)
    decay = model.ema_decay(step=10, total_steps=21)
    assert decay == pytest.approx(0.99995 + 0.00004 * 0.5)
    assert model.ema_decay(0, 21) == 0.99995 and model.ema_decay(20, 21) == pytest.approx(0.99999)
    model.update_target(decay)
    for (target, online), old in zip(model.target_parameter_pairs(), before):
        torch.testing.assert_close(target, old * decay + online * (1 - decay), rtol=0, atol=1e-7)
    assert not torch.equal(model.target_layers[0].mlp.fc1.weight, model.audio_model.layers[0].mlp.fc1.weight)


def test_new_model_starts_with_target_equal_to_online():
    model = M2D2ForPreTraining(M2D2AudioConfig(**TINY_PRETRAIN))
    for target, online in model.target_parameter_pairs():
        assert torch.equal(target, online)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_logit_scale_is_clamped():
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


def test_save_load_keeps_the_target_frozen_and_exports_the_encoder(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = M2D2ForPreTraining.from_pretrained(tmp_path)
    assert not any(t.requires_grad for t, _ in loaded.target_parameter_pairs())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    encoder = M2D2AudioModel.from_pretrained(tmp_path)
    assert torch.equal(encoder.layers[1].attention.qkv.weight, model.audio_model.layers[1].attention.qkv.weight)


def test_weight_decay_groups_and_schedule():
    model = tiny_model()
    no_decay, decay = weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert "audio_model.embeddings.cls_token" in decayed and "predictor.mask_token" in decayed
    assert "audio_projection.sem_token" in decayed and "audio_model.layers.0.attention.qkv.weight" in decayed
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in undecayed and "audio_model.layers.0.norm1.weight" in undecayed
    assert not any(n.startswith("target_") for n in decayed | undecayed)
    assert scaled_learning_rate(3e-4, 2048) == pytest.approx(2.4e-3)
    schedule = warmup_cosine_schedule(torch.optim.SGD([torch.zeros(1)], lr=1.0), 10, 110).lr_lambdas[0]
    assert schedule(0) == 0.0 and schedule(5) == 0.5 and schedule(10) == 1.0
    assert schedule(60) == pytest.approx(0.5) and schedule(110) == pytest.approx(0.0)


def test_cpu_ema_update_equals_the_foreach_arithmetic_bit_for_bit():
    model = tiny_model()
    with torch.no_grad():
        for parameter in model.audio_model.parameters():
            parameter.add_(torch.randn_like(parameter))
    target, online = map(list, zip(*model.target_parameter_pairs()))
    expected = torch._foreach_add(torch._foreach_mul(target, 0.99), torch._foreach_mul(online, 0.01))
    model.update_target(0.99)
    assert all(torch.equal(a, b) for a, b in zip(target, expected, strict=True))


def test_adamw_is_fused_on_the_cpu_and_steps_like_the_loop():
    from m2d2_hf.training.optim import adamw

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(2)]
    reference = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused = adamw([{"params": weights, "weight_decay": 0.05}], lr=1e-2, betas=(0.9, 0.95))
    loop = torch.optim.AdamW([{"params": reference, "weight_decay": 0.05}], lr=1e-2, betas=(0.9, 0.95), foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for a, b in zip(weights, reference):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b in zip(weights, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
