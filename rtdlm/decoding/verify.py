"""Lossless verification of drafted tokens (Leviathan et al. 2023), batched, per row.

Draft token x_j (drawn from q_j) is accepted with probability min(1, p_j(x_j) / q_j(x_j));
at the first rejection the next token is drawn from norm(max(0, p_j - q_j)); if all K
drafts pass, a bonus token is drawn from p_{K+1}. The emitted tokens then follow p exactly.
p and q are the *processed* distributions (penalties, temperature, filters), so the output
follows what plain `generate` samples with the same config. A greedy row has one-hot p and
q, so it accepts exactly when the draft equals the target's argmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rtdlm.sampling import draw


def verify_drafts(
    accept_keys: jax.Array,
    resample_keys: jax.Array,
    target_probs: jax.Array,
    draft_probs: jax.Array,
    drafts: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Accepts a prefix of each row's drafts and draws the token that follows it.

    Args:
      accept_keys, resample_keys: [B] keys.
      target_probs: [B, K+1, V] p_1..p_{K+1} (p_j scores draft j; p_{K+1} is the bonus).
      draft_probs: [B, K, V] q_1..q_K, the distributions the drafts were drawn from.
      drafts: [B, K] int32 drafted tokens. An id outside [0, V) (e.g. -1 padding) is
        always rejected and never emitted; the token at its position is drawn from p.

    Returns:
      num_accepted [B] in [0, K], and next_token [B]: the residual draw after the first
      rejection, or the bonus token when every draft was accepted.
    """
    batch, num_drafts = drafts.shape
    vocab = target_probs.shape[-1]
    in_vocab = (drafts >= 0) & (drafts < vocab)  # [B, K]
    draft_ids = jnp.clip(drafts, 0, vocab - 1)[..., None]
    p_draft = jnp.take_along_axis(target_probs[:, :num_drafts], draft_ids, axis=-1)[..., 0]
    p_draft = jnp.where(in_vocab, p_draft, 0.0)
    q_draft = jnp.take_along_axis(draft_probs, draft_ids, axis=-1)[..., 0]  # [B, K] > 0
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, (num_drafts,)))(accept_keys)
    accepted = uniforms * q_draft < p_draft  # probability min(1, p / q); never out of vocabulary
    num_accepted = jnp.sum(jnp.cumprod(accepted, axis=-1), axis=-1)  # leading accepts

    # q padded with zeros at index K makes the bonus case the same formula: max(0, p - 0).
    # An out-of-vocabulary draft was not drawn from its q: its residual is p itself.
    q_padded = jnp.pad(jnp.where(in_vocab[..., None], draft_probs, 0.0), ((0, 0), (0, 1), (0, 0)))
    index = num_accepted[:, None, None]
    p_next = jnp.take_along_axis(target_probs, index, axis=1)[:, 0]  # [B, V]
    q_next = jnp.take_along_axis(q_padded, index, axis=1)[:, 0]
    residual = jnp.maximum(p_next - q_next, 0.0)
    # A rejection implies p(x) < q(x), hence some residual mass; guard float round-off.
    weights = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_next)
    return num_accepted.astype(jnp.int32), draw(resample_keys, weights)
