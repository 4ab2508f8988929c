"""The RT-DLM sampling guide's facades: object-style wrappers over the functional API.

`from core.sampling import SpeculativeDecoder` in the guide reads `from rtdlm.sampling
import ...`; `rtdlm.sampling` resolves these names lazily from here, so importing the
sampling package never imports the decoders.
"""

from __future__ import annotations

import jax

from rtdlm.decoding import GenerationOutput, self_speculative_generate, speculative_generate
from rtdlm.decoding.self_speculative import check_early_exit_layer
from rtdlm.decoding.speculative import check_num_speculative_tokens
from rtdlm.sampling import SamplingConfig


class DecoderFacade:
    """What the guide's decoder facades share: K, a default config and a PRNG key stream
    (each `generate` call without a `key` takes the next one, so calls differ but replay)."""

    def __init__(self, num_speculative_tokens: int, config: SamplingConfig | None, seed: int):
        check_num_speculative_tokens(num_speculative_tokens)
        self.num_speculative_tokens = num_speculative_tokens
        self.config = SamplingConfig() if config is None else config
        self._key = jax.random.key(seed)

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 100,
        *,
        config: SamplingConfig | None = None,
        key: jax.Array | None = None,
        **kwargs,
    ) -> GenerationOutput:
        """Generates `max_new_tokens` after `input_ids` ([B, P] or [P]); extra keyword
        arguments (`prompt_lengths`, `eos_token_id`, ...) go to the decoding function."""
        if key is None:
            self._key, key = jax.random.split(self._key)
        return self._decode(
            input_ids,
            key=key,
            config=config or self.config,
            max_new_tokens=max_new_tokens,
            num_speculative_tokens=self.num_speculative_tokens,
            **kwargs,
        )

    def _decode(self, input_ids, **kwargs) -> GenerationOutput:
        raise NotImplementedError


class SpeculativeDecoder(DecoderFacade):
    """The guide's facade for draft-model speculative decoding.

    Example:
        >>> speculative = SpeculativeDecoder(target_model=main_model, draft_model=draft_model,
        ...                                  num_speculative_tokens=4)
        >>> output = speculative.generate(input_ids, max_new_tokens=100)
        >>> output.tokens, output.num_accepted / output.num_drafted
    """

    def __init__(
        self,
        target_model,
        draft_model,
        num_speculative_tokens: int = 4,
        config: SamplingConfig | None = None,
        seed: int = 0,
    ):
        super().__init__(num_speculative_tokens, config, seed)
        self.target_model, self.draft_model = target_model, draft_model

    def _decode(self, input_ids, **kwargs) -> GenerationOutput:
        return speculative_generate(self.target_model, self.draft_model, input_ids, **kwargs)


class SelfSpeculativeDecoder(DecoderFacade):
    """The guide's facade for self-speculative decoding by early exit.

    Example:
        >>> self_spec = SelfSpeculativeDecoder(model=model, early_exit_layer=6, num_speculative_tokens=4)
        >>> output = self_spec.generate(input_ids, max_new_tokens=100)
    """

    def __init__(
        self,
        model,
        early_exit_layer: int,
        num_speculative_tokens: int = 4,
        config: SamplingConfig | None = None,
        seed: int = 0,
    ):
        check_early_exit_layer(model, early_exit_layer)
        super().__init__(num_speculative_tokens, config, seed)
        self.model, self.early_exit_layer = model, early_exit_layer

    def _decode(self, input_ids, **kwargs) -> GenerationOutput:
        return self_speculative_generate(
            self.model, input_ids, early_exit_layer=self.early_exit_layer, **kwargs
        )
