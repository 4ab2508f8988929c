"""The RT-DLM sampling guide's facades: `TokenSampler`, `SpeculativeDecoder` and
`SelfSpeculativeDecoder`, object-style wrappers over the functional API.

`from core.sampling import TokenSampler` in the guide reads `from rtdlm.sampling import
...`; `rtdlm.sampling` resolves these names lazily from here, so importing the sampling
package never imports the decoders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rtdlm.decoding import GenerationOutput, self_speculative_generate, speculative_generate
from rtdlm.decoding.self_speculative import check_early_exit_layer
from rtdlm.decoding.speculative import check_num_speculative_tokens
from rtdlm.sampling import SamplingConfig, SamplingResult, sample


class TokenSampler:
    """The guide's facade: `TokenSampler().sample(logits, config, token_history=[...])`.

    Keeps its own PRNG key, so consecutive calls draw fresh tokens and a new sampler with
    the same seed (`config.seed`, else `seed` here) replays the same sequence. Each call is
    one compiled program per shape; new config values do not recompile. The history is
    padded with -1 to 64, 128, 256, ... entries, so the guide's loop (sample, append the
    token, sample again) compiles once per power of two, not once per history length.
    """

    _MIN_HISTORY = 64  # the smallest history bucket

    def __init__(self, seed: int = 0):
        self._seed = seed
        self._key: jax.Array | None = None
        self._key_seed: object = None

    def sample(self, logits, config: SamplingConfig | None = None, token_history=None) -> SamplingResult:
        config = SamplingConfig() if config is None else config
        logits = np.asarray(logits) if not isinstance(logits, jax.Array) else logits
        if not jnp.issubdtype(logits.dtype, jnp.floating):
            raise TypeError(f"logits must be a float array, got dtype {logits.dtype}")
        if token_history is not None:
            token_history = self._bucketed_history(token_history, logits.shape)
        seed = self._seed if config.seed is None else np.asarray(config.seed).reshape(-1)[0].item()
        if self._key is None or seed != self._key_seed:
            self._key, self._key_seed = jax.random.key(seed), seed
        next_key, has_nan, result = self._step(self._key, logits, config, token_history)
        if bool(has_nan):  # checked in the same program: no extra pass or dispatch
            raise ValueError("logits contain NaN")
        self._key = next_key
        return result

    @staticmethod
    @jax.jit
    def _step(key, logits, config, token_history):
        """Splits the key, flags NaN logits and samples: one dispatch per call."""
        next_key, key = jax.random.split(key)
        return next_key, jnp.isnan(logits).any(), sample(key, logits, config, token_history)

    @classmethod
    def _bucketed_history(cls, token_history, logits_shape: tuple[int, ...]) -> np.ndarray:
        """[H] or [B, H] ids -> int32, right-padded with -1 to the next bucket (>= 64, 2**n)."""
        history = np.asarray(token_history)
        if history.size == 0:  # [] (float64 to NumPy) or [[], ...]: nothing seen yet
            history = np.zeros((*logits_shape[:-1], 0), np.int32)
        elif not np.issubdtype(history.dtype, np.integer):
            raise TypeError(f"token_history must hold integer token ids, got {history.dtype}")
        elif history.min() < np.iinfo(np.int32).min or history.max() > np.iinfo(np.int32).max:
            raise ValueError("token_history holds an id outside int32")
        length = history.shape[-1]
        width = max(cls._MIN_HISTORY, 1 << max(length - 1, 0).bit_length())
        pad = [(0, 0)] * (history.ndim - 1) + [(0, width - length)]
        return np.pad(history.astype(np.int32), pad, constant_values=-1)


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
        >>> output.tokens.shape  # [B, max_new_tokens]
        (1, 100)
        >>> acceptance_rate = output.num_accepted / output.num_drafted  # [B]
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
