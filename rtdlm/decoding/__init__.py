"""Decode loops that drive a model: plain, speculative and self-speculative generation."""

from rtdlm.decoding.loop import GenerationOutput, generate
from rtdlm.decoding.model import LinenModel

__all__ = ["GenerationOutput", "LinenModel", "generate"]
