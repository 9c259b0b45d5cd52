"""Gradient signal-to-noise statistics, and the tuner's side-effect-free dense gradients."""

from __future__ import annotations

import math

import pytest
import torch

from nibble.tune import PVTuner, TeacherOutputs, TuneConfig
from nibble.tune.snr import GradientMoments, GradientSNR, gradient_snr

SHAPE, GROUPS = (16, 32), (16, 4)  # 64 groups of 8 weights along the input


def sampled(mean: torch.Tensor, sigma: float, count: int, seed: int = 0) -> GradientMoments:
    g = torch.Generator().manual_seed(seed)
    moments = GradientMoments()
    for _ in range(count):
        moments.add(mean + sigma * torch.randn(mean.shape, generator=g))
    return moments


def test_signal_and_noise_are_recovered_and_scale_with_tokens():
    mean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 0.3
    stats = gradient_snr(sampled(mean, 1.0, 400), GROUPS, tokens=1024)
    numel = mean.numel()
    assert stats.noise == pytest.approx(numel, rel=0.03)
    assert stats.signal == pytest.approx(float(mean.pow(2).sum()), rel=0.1)
    ratio = float(mean.pow(2).sum()) / numel
    assert stats.ratio(1024) == pytest.approx(ratio, rel=0.1)
    assert stats.ratio(4096) == pytest.approx(4 * stats.ratio(1024))
    assert stats.tokens_for_ratio(1.0) == pytest.approx(1024 / stats.ratio(1024))


def test_pure_noise_has_no_signal():
    stats = gradient_snr(sampled(torch.zeros(SHAPE), 2.0, 50), GROUPS, tokens=512)
    assert abs(stats.signal) < 0.005 * stats.noise  # uncorrected, ‖mean‖² would carry N / K = 0.02 N
    negative = GradientSNR(-1.0, 1.0, 512, torch.zeros(1), torch.ones(1))
    assert math.isinf(negative.tokens_for_ratio())


def test_groups_above_counts_groups_with_a_consistent_gradient():
    mean = torch.zeros(SHAPE)
    mean[:, :16] = 1.0  # the first two of every row's four groups: signal 8 per group, noise 8
    stats = gradient_snr(sampled(mean, 1.0, 200), GROUPS, tokens=1000)
    assert stats.groups_above(1000, ratio=0.5) == pytest.approx(0.5)
    assert stats.groups_above(1000, ratio=2.0) == pytest.approx(0.0)
    assert stats.groups_above(4000, ratio=2.0) == pytest.approx(0.5)


def test_combined_statistics_add_up_and_refuse_mixed_batches():
    a = gradient_snr(sampled(torch.ones(SHAPE), 1.0, 20, seed=1), GROUPS, tokens=256)
    b = gradient_snr(sampled(torch.zeros(SHAPE), 1.0, 20, seed=2), GROUPS, tokens=256)
    both = GradientSNR.combine([a, b])
    assert both.signal == pytest.approx(a.signal + b.signal) and both.noise == pytest.approx(a.noise + b.noise)
    assert both.group_signal.numel() == 2 * 64
    with pytest.raises(ValueError, match="batch sizes"):
        GradientSNR.combine([a, gradient_snr(sampled(torch.ones(SHAPE), 1.0, 20), GROUPS, tokens=512)])
    with pytest.raises(ValueError, match="two gradient samples"):
        single = GradientMoments()
        single.add(torch.ones(SHAPE))
        single.mean_and_variance()


def test_dense_gradients_are_linear_in_the_batch_and_change_nothing(make_aqlm_student, teacher, windows):
    train = windows[:16]
    tuner = PVTuner(make_aqlm_student(teacher), TeacherOutputs(teacher, train), train, TuneConfig(batch_size=2))
    state = {k: v.clone() for k, v in tuner.model_state().items()}
    pair = tuner.dense_gradients([0, 1])
    first, second = tuner.dense_gradients([0]), tuner.dense_gradients([1])
    assert set(pair) == set(tuner.layers)
    for name, grad in pair.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, (first[name] + second[name]) / 2, rtol=1e-4, atol=1e-7)
    assert all(torch.equal(state[k], v) for k, v in tuner.model_state().items())
    assert tuner.step == 0 and not tuner.p_opt.exp_avg and not tuner.v_opt.exp_avg
    assert all(p.grad is None for p in tuner.params.values())
