"""Decode loops that drive a model: plain, speculative and self-speculative generation."""

from rtdlm.decoding.loop import GenerationOutput, generate
from rtdlm.decoding.model import LinenModel
from rtdlm.decoding.self_speculative import SelfSpeculativeDecoder, self_speculative_generate
from rtdlm.decoding.speculative import SpeculativeDecoder, speculative_generate
from rtdlm.decoding.verify import verify_drafts

__all__ = [
    "GenerationOutput",
    "LinenModel",
    "SelfSpeculativeDecoder",
    "SpeculativeDecoder",
    "generate",
    "self_speculative_generate",
    "speculative_generate",
    "verify_drafts",
]
