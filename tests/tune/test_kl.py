"""The chunked KL(teacher ‖ student) loss: exact against dense logits, zero at equality."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nibble.tune import Head, chunked_kl, chunked_nll, kl_reference
from nibble.tune.teacher import final_hidden


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_kl_and_its_gradients_match_dense_logits(bias):
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(3, 7, 16, generator=g, requires_grad=True), torch.randn(3, 7, 16, generator=g)
    ws, wt = torch.randn(101, 16, generator=g, requires_grad=True), torch.randn(101, 16, generator=g)
    bs = torch.randn(101, generator=g, requires_grad=True) if bias else None
    bt = torch.randn(101, generator=g) if bias else None

    dense = kl_reference(F.linear(hs, ws, bs), F.linear(ht, wt, bt))
    expected = torch.autograd.grad(dense, [hs, ws] + ([bs] if bias else []))
    chunked = chunked_kl(hs, Head(ws, bs), ht, Head(wt, bt), rows=5, cols=13)
    got = torch.autograd.grad(chunked, [hs, ws] + ([bs] if bias else []))

    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_kl_is_zero_with_zero_gradient_when_student_equals_teacher(teacher, windows):
    student = copy.deepcopy(teacher)
    student.model.norm.weight.requires_grad_(True)
    with torch.no_grad():
        teacher_hidden = final_hidden(teacher, windows[:4])
    loss = chunked_kl(final_hidden(student, windows[:4]), Head.of(student), teacher_hidden, Head.of(teacher),
                      rows=50, cols=100)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(student.model.norm.weight.grad) == 0
    with torch.no_grad():  # and it is not zero once the student differs
        student.model.norm.weight.mul_(1.1)
    assert chunked_kl(final_hidden(student, windows[:4]), Head.of(student), teacher_hidden,
                      Head.of(teacher)).item() > 1e-4


def test_chunked_nll_matches_cross_entropy():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 9, 8, generator=g), torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    expected = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(chunked_nll(hidden, Head(weight), targets, rows=4, cols=7).float(), expected)
