"""The V step on both representations: at most τ of the groups change, always onto representable values."""

from __future__ import annotations

import pytest
import torch

from nibble.formats.aqlm import AQLMLinear, codes_to_index
from nibble.formats.scalar import ScalarQuantLinear
from nibble.tune.vstep import changed_groups, expand_mask, group_gains, group_sq_norms, top_fraction_mask, v_step


def scalar_layer(make_scalar_student, teacher) -> ScalarQuantLinear:
    return make_scalar_student(teacher, bits=2).model.layers[0].mlp.down_proj


def aqlm_layer(make_aqlm_student, teacher) -> AQLMLinear:
    return make_aqlm_student(teacher).model.layers[0].mlp.down_proj


def assert_representable(layer) -> None:
    """Ŵ is exactly what the codes decode to, and a fixed point of the projection."""
    weight = layer.dequantize().clone()
    if isinstance(layer, ScalarQuantLinear):
        q = layer.integers()
        assert q.min() >= 0 and q.max() < 2**layer.bits
        grid = (weight / layer.scales.repeat_interleave(layer.group_size, 1)
                + layer.zero_points().repeat_interleave(layer.group_size, 1))
        torch.testing.assert_close(grid, q.float(), rtol=0, atol=1e-4)
    else:
        index = codes_to_index(layer.codes)
        assert index.min() >= 0 and index.max() < 2**layer.nbits_per_codebook
    codes = [b.clone() for b in layer.buffers(recurse=False)]
    layer.project_(weight)
    assert all(torch.equal(a, b) for a, b in zip(codes, layer.buffers(recurse=False)))
    assert torch.equal(layer.dequantize(), weight)


def test_top_fraction_mask_takes_the_largest_positive_scores():
    scores = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0]])
    assert top_fraction_mask(scores, 0.34).tolist() == [[False, True, False], [True, False, False]]
    assert top_fraction_mask(scores, 1.0).sum() == 4  # zero scores are never chosen
    assert top_fraction_mask(scores, 0.1).sum() == 0


@pytest.mark.parametrize("fmt", ["scalar", "aqlm"])
@pytest.mark.parametrize("tau", [0.01, 0.1, 0.5])
def test_v_step_changes_at_most_tau_of_the_groups_onto_representable_values(fmt, tau, make_scalar_student,
                                                                           make_aqlm_student, teacher):
    layer = scalar_layer(make_scalar_student, teacher) if fmt == "scalar" else aqlm_layer(make_aqlm_student, teacher)
    before = layer.dequantize().clone()
    g = torch.Generator().manual_seed(1)
    target = before + torch.randn(before.shape, generator=g) * before.std()
    groups = layer.group_shape[0] * layer.group_shape[1]
    stats = v_step(layer, target, tau)
    changed = changed_groups(before, layer.dequantize(), layer.group_shape)
    assert stats.changed == int(changed.sum()) <= stats.selected <= int(tau * groups)
    assert stats.changed > 0
    # the changed groups are among the highest-scoring ones
    scores = group_sq_norms(target - before, layer.group_shape)
    assert scores[changed].min() >= scores.flatten().topk(stats.selected).values.min()
    assert_representable(layer)


@pytest.mark.parametrize("fmt", ["scalar", "aqlm", "aqlm-hessian"])
def test_trust_ratio_caps_the_relative_change(fmt, make_scalar_student, make_aqlm_student, teacher):
    layer = scalar_layer(make_scalar_student, teacher) if fmt == "scalar" else aqlm_layer(make_aqlm_student, teacher)
    before = layer.dequantize().clone()
    g = torch.Generator().manual_seed(2)
    target = before + torch.randn(before.shape, generator=g) * before.std() * 3
    metric = None
    if fmt == "aqlm-hessian":
        x = torch.randn(512, before.shape[1], generator=g)
        metric = {"hessian": x.T @ x / 512 + 0.01 * torch.eye(before.shape[1])}
    stats = v_step(layer, target, tau=0.5, trust_ratio=0.05, metric=metric)
    change = (layer.dequantize() - before).norm() / before.norm()
    assert 0 < change <= 0.05 + 1e-6 and stats.relative_change == pytest.approx(change.item(), rel=1e-5)
    assert_representable(layer)


def test_v_step_with_tau_zero_or_an_unchanged_target_changes_nothing(make_scalar_student, teacher):
    layer = scalar_layer(make_scalar_student, teacher)
    before = layer.dequantize().clone()
    assert v_step(layer, before + 1.0, 0.0).changed == 0
    assert v_step(layer, before, 1.0).changed == 0
    assert torch.equal(layer.dequantize(), before)


@pytest.mark.parametrize("fmt", ["scalar", "aqlm"])
def test_gain_selection_keeps_only_re_encodings_that_lower_the_linearized_loss(fmt, make_scalar_student,
                                                                              make_aqlm_student, teacher):
    layer = scalar_layer(make_scalar_student, teacher) if fmt == "scalar" else aqlm_layer(make_aqlm_student, teacher)
    before = layer.dequantize().clone()
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(before.shape, generator=g)
    # a noisy move: mostly against the gradient, but many coordinates go the wrong way
    target = before - (0.5 * grad.sign() + torch.randn(before.shape, generator=g)) * before.std()
    stats = v_step(layer, target, tau=0.3, grad=grad)
    after = layer.dequantize()
    changed = changed_groups(before, after, layer.group_shape)
    gains = group_gains(grad, before - after, layer.group_shape)
    assert stats.changed == int(changed.sum()) > 0
    assert (gains[changed] > 0).all()
    assert_representable(layer)


def test_gain_selection_ranks_groups_by_the_gradient_not_the_move(make_scalar_student, teacher):
    layer = scalar_layer(make_scalar_student, teacher)
    before = layer.dequantize().clone()
    rows, cols = layer.group_shape
    # every group is asked to move by the same amount; the gradient is large in a few groups only
    grad = torch.full(before.shape, 1e-3)
    hot = torch.zeros(layer.group_shape, dtype=torch.bool)
    hot[0, : max(1, cols // 4)] = True
    grad.view(rows, -1, cols, before.shape[1] // cols).masked_fill_(hot[:, None, :, None], 1.0)
    target = before - 3 * before.std() * torch.sign(grad)
    tau = hot.sum().item() / (rows * cols)
    v_step(layer, target, tau=tau, grad=grad)
    changed = changed_groups(before, layer.dequantize(), layer.group_shape)
    assert changed.any() and not (changed & ~hot).any()


def test_under_a_hessian_moves_not_taken_do_not_steer_the_re_encoded_groups(make_aqlm_student, teacher):
    student = make_aqlm_student(teacher)
    layer = aqlm_layer(lambda t: student, teacher)
    twin = aqlm_layer(lambda t: make_aqlm_student(teacher), teacher)
    before = layer.dequantize().clone()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, before.shape[1], generator=g) * torch.rand(before.shape[1], generator=g) * 3
    metric = {"hessian": x.T @ x / 512 + 0.01 * torch.eye(before.shape[1])}
    chosen = torch.zeros(layer.group_shape, dtype=torch.bool)
    chosen[: chosen.shape[0] // 4, 0] = True  # these groups get the largest moves
    elements = expand_mask(chosen, before.shape)
    move = torch.randn(before.shape, generator=g) * before.std()
    target = before + torch.where(elements, 2 * move, 0.5 * move)  # smaller moves everywhere else
    tau = chosen.sum().item() / chosen.numel()
    v_step(layer, target, tau, metric=metric)
    v_step(twin, torch.where(elements, target, before), tau, metric=metric)  # only the chosen moves
    assert changed_groups(before, layer.dequantize(), layer.group_shape).any()
    assert torch.equal(layer.dequantize(), twin.dequantize())
