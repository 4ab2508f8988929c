"""`score()`: teacher-forced log-probabilities of given tokens (prompt logprobs, perplexity)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rtdlm.decoding.common import check_generation_args
from rtdlm.sampling import SamplingConfig


def score(model, tokens, *, prompt_lengths=None) -> jax.Array:
    """`log p(tokens[:, t] | tokens[:, :t])` under the model's own distribution (its
    log-softmax: no processors, temperature 1), from one forward pass.

    Args:
      model: follows the model contract; needs `init_cache` for P slots.
      tokens: [B, P] int token ids, right-padded; `prompt_lengths` [B] gives each row's
        length (default P).

    Returns:
      [B, P] float32; position 0 (nothing to condition on) and padding give 0.0. The sum
      over a row is the log-likelihood of its tokens after the first; perplexity is
      `exp(-sum / (length - 1))`.

    Example:
      >>> logprobs = score(model, prompt)  # prompt [B, P]
      >>> logprobs.shape, float(logprobs[0, 0])
      ((1, 3), 0.0)
    """
    tokens, lengths, _ = check_generation_args(model, tokens, prompt_lengths, 1, SamplingConfig())
    return _score(model, tokens, lengths)


@jax.jit
def _score(model, tokens, lengths):
    batch, width = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    logits, _ = model(tokens, positions, model.init_cache(batch, width))  # [B, P, V]
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, P-1]
    picked = jnp.pad(picked, ((0, 0), (1, 0)))
    return jnp.where(positions < lengths[:, None], picked, 0.0)
