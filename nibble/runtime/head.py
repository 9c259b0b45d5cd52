"""Quantizing the output head for decoding.

On a small model the output head is a large share of the weights read per token (SmolLM2-135M:
49152 x 576, a fifth of all parameters, 113 MB in float32), so a 2-bit body still decodes at the
speed of its float head. ``quantize_head`` rounds the head to 8-bit integers with a scale and zero
point per output row (RTN; llama.cpp keeps such heads at Q8_0), or to 4-bit integers with a scale and
zero point per group of inputs, which the C++ decode step reads through its scalar kernels. The
input embedding, when tied to the head, stays as it is.
"""

from __future__ import annotations

from torch import nn

from nibble.formats.scalar import ScalarQuantLinear
from nibble.quantize.rtn import RTNConfig, RTNQuantizer

HEAD_BITS = (8, 4)
DEFAULT_GROUP_SIZE = {8: -1, 4: 64}  # -1: one group per output row


def quantize_head(model: nn.Module, bits: int = 8, group_size: int | None = None) -> nn.Module:
    """Replace ``model.lm_head`` (an ``nn.Linear``) by its ``bits``-bit RTN quantization, in place,
    with ``group_size`` inputs per scale (default ``DEFAULT_GROUP_SIZE[bits]``)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"the output head is a {type(head).__name__}, not a float nn.Linear: already quantized?")
    model.set_output_embeddings(round_head(head, bits, group_size))
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # the embedding keeps its own float weight
    return model


def round_head(head: nn.Linear, bits: int = 8, group_size: int | None = None) -> ScalarQuantLinear:
    """``head`` rounded to ``bits``-bit integers (RTN, asymmetric), ``group_size`` inputs per scale
    (default ``DEFAULT_GROUP_SIZE[bits]``); ``head`` is left as it is."""
    if bits not in HEAD_BITS:
        raise ValueError(f"head bits must be one of {HEAD_BITS}, got {bits}")
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE[bits]
    quantizer = RTNQuantizer(RTNConfig(bits=bits, group_size=group_size))
    return quantizer.quantize_layer("lm_head", head, None).to(head.weight.device)
