"""PV-Tuning (Malinovskii et al., 2024): whole-model fine-tuning of quantized students against a
float teacher, training continuous parameters (P step) and discrete codes (V step)."""

from nibble.tune.config import TuneConfig
from nibble.tune.kl import Head, chunked_kl, chunked_nll, kl_reference
from nibble.tune.pv import PVTuner, StepResult, trainable_parameters
from nibble.tune.run import TuneData, finetune_to_dir
from nibble.tune.teacher import TeacherOutputs
from nibble.tune.vstep import VStepStats, v_step

__all__ = ["TuneConfig", "TuneData", "PVTuner", "StepResult", "TeacherOutputs", "Head", "VStepStats",
           "chunked_kl", "chunked_nll", "kl_reference", "finetune_to_dir", "trainable_parameters", "v_step"]
