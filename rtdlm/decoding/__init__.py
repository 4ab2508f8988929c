"""Decode loops that drive a model: plain, speculative and self-speculative generation."""

from rtdlm.decoding.beam import BeamSearchOutput, beam_search
from rtdlm.decoding.common import GenerationOutput, emit_accepted
from rtdlm.decoding.loop import generate
from rtdlm.decoding.model import LinenModel, Model, SharesLayers, reorder_cache
from rtdlm.decoding.prompt_lookup import PromptLookup, prompt_lookup_generate
from rtdlm.decoding.score import score
from rtdlm.decoding.self_speculative import self_speculative_generate
from rtdlm.decoding.speculative import (
    Drafting,
    ModelDrafting,
    Proposal,
    Round,
    advance_states,
    speculative_generate,
)
from rtdlm.decoding.verify import verify_drafts

__all__ = [
    "BeamSearchOutput",
    "Drafting",
    "GenerationOutput",
    "LinenModel",
    "Model",
    "ModelDrafting",
    "PromptLookup",
    "Proposal",
    "Round",
    "SharesLayers",
    "advance_states",
    "beam_search",
    "emit_accepted",
    "generate",
    "prompt_lookup_generate",
    "reorder_cache",
    "score",
    "self_speculative_generate",
    "speculative_generate",
    "verify_drafts",
]


def __getattr__(name):
    # The guide's facades, for code that imported them from here before they moved.
    if name in ("SpeculativeDecoder", "SelfSpeculativeDecoder"):
        import rtdlm.guide

        return getattr(rtdlm.guide, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
