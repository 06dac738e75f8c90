"""Lossless and cast codecs: ``identity`` (fp32 as is), ``fp16`` and ``bf16``.

All three are linear: a sum of encodings decodes to the sum of the inputs (up to the rounding
of the cast), so they also serve ``mode="allreduce"``. Like torch's fp16 DDP hook, the cast
codecs divide by the world size *before* casting, so a sum of P values cannot overflow fp16.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import LinearCodec
from .payload import CODEC_IDS, Payload


class _Cast(LinearCodec):
    wire_dtype: ClassVar[torch.dtype]
    fixed_size = True

    def compress(self, g: torch.Tensor) -> Payload:
        data = g.detach().reshape(-1).to(self.wire_dtype)
        if data.data_ptr() == g.data_ptr():  # identity: never alias the caller's gradient
            data = data.clone()
        return Payload(CODEC_IDS[self.name], tuple(g.shape), g.dtype, (), [data])

    def decompress(self, payload: Payload) -> torch.Tensor:
        payload.expect(self.name, 0, [(self.wire_dtype, payload.numel)])
        return payload.parts[0].to(payload.dtype).reshape(payload.shape)

    def encode_sum(self, g, agreed, world_size):
        if self.wire_dtype == torch.float32:
            return g.detach().reshape(-1).to(torch.float32, copy=True)
        return (g.detach().reshape(-1) / world_size).to(self.wire_dtype)

    def decode_sum(self, total, agreed, world_size):
        if self.wire_dtype == torch.float32:
            return total / world_size
        return total.to(torch.float32)

    def decode_local(self, wire, agreed, world_size):
        if self.wire_dtype == torch.float32:
            return wire.clone()
        return wire.to(torch.float32) * world_size


class Identity(_Cast):
    """fp32 as is: the baseline every other codec is measured against."""

    name = "identity"
    wire_dtype = torch.float32


class FP16(_Cast):
    """IEEE half precision (2 bytes a value)."""

    name = "fp16"
    wire_dtype = torch.float16


class BF16(_Cast):
    """bfloat16 (2 bytes a value, fp32's exponent range)."""

    name = "bf16"
    wire_dtype = torch.bfloat16
