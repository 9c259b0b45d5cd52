"""The tuner on tiny models: what it trains, that tuning lowers held-out KL, both formats, both modes."""

from __future__ import annotations

import pytest
import torch

from nibble.errors import ConfigError
from nibble.tune import PVTuner, TeacherOutputs, TuneConfig, trainable_parameters
from nibble.tune.optim import NamedAdam


def tune(student, teacher, windows, config: TuneConfig, steps: int):
    train, held_out = windows[:16], windows[16:]
    tuner = PVTuner(student, TeacherOutputs(teacher, train), train, config)
    held_out_teacher = TeacherOutputs(teacher, held_out)
    before = tuner.evaluate(held_out, held_out_teacher)
    results = [tuner.train_step([(4 * k + j) % 16 for j in range(4)]) for k in range(steps)]
    return before, tuner.evaluate(held_out, held_out_teacher), results


def test_trainable_parameters_are_scales_norms_and_biases_unless_asked(make_scalar_student, teacher):
    student = make_scalar_student(teacher)
    names = set(trainable_parameters(student, TuneConfig()))
    assert "model.layers.0.self_attn.q_proj.scales" in names and "model.norm.weight" in names
    assert "model.layers.1.input_layernorm.weight" in names and "model.embed_tokens.weight" not in names
    assert all(p.requires_grad == (n in names) for n, p in student.named_parameters())
    names = set(trainable_parameters(student, TuneConfig(train_norms=False, train_non_quantized=True)))
    assert "model.embed_tokens.weight" in names and "model.norm.weight" not in names


@pytest.mark.parametrize("mode", ["pv", "ste"])
def test_tuning_lowers_held_out_kl_of_a_scalar_student(mode, make_scalar_student, teacher, windows):
    tau = 0.002 if mode == "pv" else 1.0
    config = TuneConfig(mode=mode, lr=3e-4, tau=tau, v_lr=0.5 if mode == "pv" else 0.003, batch_size=4)
    before, after, results = tune(make_scalar_student(teacher), teacher, windows, config, steps=6)
    assert after["kl"] < 0.9 * before["kl"]
    assert any(r.changed for r in results)
    assert all(r.changed <= tau * r.groups for r in results)


def test_pv_tuning_lowers_held_out_kl_of_an_aqlm_student(make_aqlm_student, teacher, windows):
    config = TuneConfig(lr=1e-3, tau=0.05, v_lr=0.5, batch_size=4)
    before, after, results = tune(make_aqlm_student(teacher), teacher, windows, config, steps=6)
    assert after["kl"] < 0.9 * before["kl"]
    assert sum(r.changed for r in results) > 0
    assert all(r.changed <= 0.05 * r.groups for r in results)


def test_p_step_alone_never_touches_codes(make_scalar_student, teacher, windows):
    student = make_scalar_student(teacher)
    codes = {n: b.clone() for n, b in student.named_buffers() if n.endswith("qweight")}
    _, _, results = tune(student, teacher, windows, TuneConfig(tau=0.0, batch_size=4), steps=2)
    assert all(r.changed == 0 for r in results)
    assert all(torch.equal(codes[n], b) for n, b in student.named_buffers() if n in codes)


@pytest.mark.parametrize("bad", [dict(mode="qat"), dict(tau=1.5), dict(v_start=-1), dict(batch_size=0),
                                 dict(trust_ratio=0.0), dict(schedule="linear"), dict(min_lr_ratio=1.5),
                                 dict(v_memory=1.5), dict(v_select="largest"), dict(mode="ste", v_select="gain"),
                                 dict(v_metric="xtx")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        TuneConfig(**bad).validate()


def test_cosine_schedule_decays_from_one_to_the_floor():
    config = TuneConfig(steps=11, schedule="cosine", min_lr_ratio=0.1)
    factors = [config.lr_factor(step) for step in range(11)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert factors[5] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert TuneConfig(steps=11, schedule="constant").lr_factor(7) == 1.0


def test_the_schedule_sets_both_learning_rates(make_scalar_student, teacher, windows):
    config = TuneConfig(lr=1e-3, v_lr=0.2, tau=0.05, batch_size=4, steps=3, schedule="cosine", min_lr_ratio=0.25)
    train = windows[:16]
    tuner = PVTuner(make_scalar_student(teacher), TeacherOutputs(teacher, train), train, config)
    for step in range(3):
        tuner.train_step([4 * step + j for j in range(4)])
    assert tuner.p_opt.lr == pytest.approx(0.25e-3) and tuner.v_opt.lr == pytest.approx(0.05)


def test_first_v_direction_cannot_rank_groups_so_v_steps_start_at_step_one():
    """Adam's first direction is sign(grad): every weight proposes a move of the same size, so a
    V step at step 0 would pick its groups by position; the second direction already differs."""
    adam = NamedAdam(1.0, TuneConfig().v_betas)
    grads = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    first = adam.direction("w", grads[0]).abs()
    torch.testing.assert_close(first, torch.ones_like(first), rtol=0, atol=1e-3)  # |g| / (|g| + eps)
    second = adam.direction("w", grads[1]).abs()
    assert float(second.max()) > 5 * float(second.min())
    assert TuneConfig().v_start == 1


def test_v_steps_wait_for_v_start_and_respect_the_trust_ratio(make_scalar_student, teacher, windows):
    config = TuneConfig(lr=1e-4, tau=0.05, v_lr=1.0, v_start=2, trust_ratio=0.05, batch_size=4)
    _, _, results = tune(make_scalar_student(teacher), teacher, windows, config, steps=4)
    assert [r.changed for r in results[:2]] == [0, 0] and results[2].changed > 0
    assert all(r.relative_change <= 0.05 + 1e-7 for r in results)


def test_gain_selection_runs_in_the_tuner_and_moves_codes_downhill(make_scalar_student, teacher, windows):
    config = TuneConfig(tau=0.05, v_lr=1.0, trust_ratio=None, v_select="gain").validate()
    train = windows[:16]
    tuner = PVTuner(make_scalar_student(teacher), TeacherOutputs(teacher, train), train, config)
    name = "model.layers.0.mlp.down_proj"
    layer = tuner.layers[name]
    before = tuner.decoded(name).clone()
    grad = torch.randn(before.shape, generator=torch.Generator().manual_seed(0))
    stats = tuner._v_step_layer(name, layer, grad.clone())
    assert stats.changed > 0
    assert float((grad * (before - layer.dequantize().detach())).sum()) > 0


@pytest.mark.parametrize("memory", [0.0, 1.0])
def test_v_memory_lets_small_moves_add_up_to_a_code_change(memory, make_scalar_student, teacher, windows):
    """A move of 0.3 grid steps never changes a code alone; with memory 1 two such moves make 0.6
    steps, past the rounding midpoint of the finest group."""
    config = TuneConfig(tau=1.0, trust_ratio=None, v_memory=memory).validate()
    train = windows[:16]
    tuner = PVTuner(make_scalar_student(teacher), TeacherOutputs(teacher, train), train, config)
    name = "model.layers.0.mlp.down_proj"
    layer = tuner.layers[name]
    current = tuner.decoded(name)
    tuner.v_opt.lr = 0.3 * float(layer.scales.detach().min()) / float(current.pow(2).mean().sqrt())
    grad = torch.randn(current.shape, generator=torch.Generator().manual_seed(0))  # Adam direction: sign(grad)
    first = tuner._v_step_layer(name, layer, grad.clone())
    second = tuner._v_step_layer(name, layer, grad.clone())
    assert first.changed == 0
    assert (second.changed > 0) == (memory == 1.0)
    state = tuner.local_optimizer_state()
    assert (f"residual::{name}" in state) == (memory > 0)
