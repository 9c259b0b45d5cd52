"""The V step's re-encoding metric from the training inputs (``nibble.tune.metric``)."""

from __future__ import annotations

import pytest
import torch

from nibble.errors import ConfigError
from nibble.tune import PVTuner, TeacherOutputs, TuneConfig


def test_input_metric_weights_columns_by_the_training_inputs(make_aqlm_student, teacher, windows):
    config = TuneConfig(tau=0.2, v_lr=2.0, trust_ratio=None, batch_size=4, v_metric="inputs", v_start=0).validate()
    train = windows[:8]
    tuner = PVTuner(make_aqlm_student(teacher), TeacherOutputs(teacher, train), train, config)
    name = "model.layers.0.mlp.down_proj"
    assert tuner.inputs.column_weights(name) is None  # nothing seen yet
    tuner.evaluate(windows[8:10], TeacherOutputs(teacher, windows[8:10]))
    assert tuner.inputs.column_weights(name) is None  # evaluation does not count
    inputs = []
    hook = tuner.layers[name].register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    result = tuner.train_step([0, 1, 2, 3])
    hook.remove()
    seen = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
    expected = seen.pow(2).mean(0)  # every training forward (checkpoint recomputations too)
    torch.testing.assert_close(tuner.inputs.column_weights(name), expected.clamp_min(1e-8 * float(expected.max())))
    assert result.changed > 0
    # the statistics travel with the optimizer state, so a resumed run weights columns the same way
    resumed = PVTuner(make_aqlm_student(teacher), TeacherOutputs(teacher, train), train, config)
    resumed.load_optimizer_state(tuner.local_optimizer_state())
    assert torch.equal(resumed.inputs.column_weights(name), tuner.inputs.column_weights(name))


def test_hessian_metric_uses_the_first_steps_inputs(make_aqlm_student, make_scalar_student, teacher, windows):
    config = TuneConfig(tau=0.2, v_lr=2.0, trust_ratio=None, batch_size=2, v_metric="hessian", v_start=0).validate()
    train = windows[:8]
    tuner = PVTuner(make_aqlm_student(teacher), TeacherOutputs(teacher, train), train, config)
    name = "model.layers.0.self_attn.o_proj"
    inputs = []
    hook = tuner.layers[name].register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    first = tuner.train_step([0, 1])
    hook.remove()
    seen = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
    hessian = tuner.inputs.project_kwargs(name)["hessian"]
    expected = seen.T @ seen / len(seen)
    expected = expected / expected.diagonal().mean() + 0.01 * torch.eye(len(expected))
    torch.testing.assert_close(hessian, expected, rtol=1e-4, atol=1e-5)
    tuner.train_step([2, 3])  # later steps do not change it
    assert torch.equal(tuner.inputs.project_kwargs(name)["hessian"], hessian) and first.changed > 0
    with pytest.raises(ConfigError, match="hessian"):
        PVTuner(make_scalar_student(teacher), TeacherOutputs(teacher, train), train, config)
