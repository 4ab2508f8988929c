"""Self-speculative decoding: the model's own early exit drafts, the full model verifies.

The draft is `model(..., exit_layer=E)` through the shared head. With the optional model
methods `embed`, `run_layers` and `logits`, verification reuses the draft's work
(LayerSkip's shared cache): layers < E already ran for the drafted tokens and wrote their
KV cache, so verification runs layers < E for the last draft only and layers >= E for all
K+1 positions. Models without those methods fall back to a full verification pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rtdlm.decoding.common import GenerationOutput
from rtdlm.decoding.model import SharesLayers, prefill_prompt
from rtdlm.decoding.speculative import ModelDrafting, check_num_speculative_tokens, run_speculative
from rtdlm.sampling import DEFAULT_PROCESSORS, Processor, SamplingConfig


def check_early_exit_layer(model, early_exit_layer) -> None:
    """`early_exit_layer` must be an int in [1, num_layers - 1] (upper bound if known)."""
    if isinstance(early_exit_layer, (bool, np.bool_)) or not isinstance(early_exit_layer, (int, np.integer)):
        raise TypeError(f"early_exit_layer must be an int, got {early_exit_layer!r}")
    num_layers = getattr(model, "num_layers", None)
    if isinstance(num_layers, int) and not 1 <= early_exit_layer < num_layers:
        raise ValueError(
            f"early_exit_layer must be in [1, {num_layers - 1}] for a {num_layers}-layer model, "
            f"got {early_exit_layer}"
        )
    if early_exit_layer < 1:
        raise ValueError(f"early_exit_layer must be >= 1, got {early_exit_layer}")


def can_share_layers(model) -> bool:
    """Whether the model has the `SharesLayers` methods (and an int `num_layers`)."""
    return isinstance(model, SharesLayers) and isinstance(getattr(model, "num_layers", None), int)


@dataclasses.dataclass(frozen=True)
class EarlyExit(ModelDrafting):
    """models = the model; caches = its one cache, shared by draft and verify passes."""

    exit_layer: int
    share_layers: bool

    def prefill(self, model, prompt, cache_length):
        return prefill_prompt(model, prompt, cache_length)

    def draft(self, model, cache, tokens, positions):
        if not self.share_layers:
            logits, cache = model(tokens, positions, cache, exit_layer=self.exit_layer)
            return logits[:, -1], cache, None
        hidden, cache = model.run_layers(model.embed(tokens), positions, cache, 0, self.exit_layer)
        return model.logits(hidden[:, -1:])[:, 0], cache, hidden[:, -1]  # saved: [B, D]

    def verify(self, model, cache, tokens, positions, saved):
        if not self.share_layers:
            return model(tokens, positions, cache)
        # saved: [K, B, D], layer-E states of tokens[:, :K]; the last draft still needs layers < E.
        last, cache = model.run_layers(
            model.embed(tokens[:, -1:]), positions[:, -1:], cache, 0, self.exit_layer
        )
        hidden = jnp.concatenate([jnp.swapaxes(saved, 0, 1), last], axis=1)  # [B, K+1, D]
        hidden, cache = model.run_layers(hidden, positions, cache, self.exit_layer, model.num_layers)
        return model.logits(hidden), cache


def self_speculative_generate(
    model,
    prompt_tokens,
    *,
    key: jax.Array,
    config: SamplingConfig,
    max_new_tokens: int,
    early_exit_layer: int,
    num_speculative_tokens: int = 4,
    prompt_lengths=None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    share_layers: bool | None = None,
    processors: Processor = DEFAULT_PROCESSORS,
    **output_args,
) -> GenerationOutput:
    """Speculative decoding with the model's first `early_exit_layer` layers as the draft.

    Lossless like `speculative_generate`: the output follows `generate(model, ...)` exactly.
    `share_layers` (default: when the model supports it) reuses the draft's hidden states
    and cache in verification; `False` forces the full verification pass. `processors`:
    as for `speculative_generate`; `output_args`: `generate`'s stop, sample and logprob arguments.
    """
    check_num_speculative_tokens(num_speculative_tokens)
    check_early_exit_layer(model, early_exit_layer)
    if share_layers is None:
        share_layers = can_share_layers(model)
    elif share_layers and not can_share_layers(model):
        raise ValueError("share_layers=True needs a model with embed, run_layers, logits and num_layers")
    return run_speculative(
        EarlyExit(int(early_exit_layer), share_layers),
        model,
        model,
        prompt_tokens,
        key=key,
        config=config,
        max_new_tokens=max_new_tokens,
        num_speculative_tokens=num_speculative_tokens,
        prompt_lengths=prompt_lengths,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        processors=processors,
        **output_args,
    )
