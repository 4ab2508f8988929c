"""Checks on 8 CPU host devices; run by tests/test_sharding.py in its own process, since
XLA_FLAGS must be set before JAX starts (the other tests keep one device)."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from rtdlm.decoding import generate, self_speculative_generate, speculative_generate  # noqa: E402
from rtdlm.decoding.testing import random_markov_model  # noqa: E402
from rtdlm.sampling import SamplingConfig, sample  # noqa: E402
from rtdlm.sharding import sharded_sample  # noqa: E402

B, V = 8, 4096
CONFIGS = [
    SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    SamplingConfig(top_p=0.95),  # flat rows: the nucleus exceeds the candidates -> fallback
    SamplingConfig(temperature=np.array([0.0, 0.5, 1, 1.2, 0, 1, 1, 1.0]), top_p=0.9, typical_p=0.8),
    SamplingConfig(top_k=3000, banned_token_ids=[1, 2, 3], logit_bias={5: 10.0}, seed=np.arange(8)),
    # stateful n-gram bans: each device masks the banned ids inside its vocabulary block
    SamplingConfig(
        temperature=0.8, no_repeat_ngram_size=2, bad_words_ids=[[7, 9], [11]], presence_penalty=0.5
    ),
]


def all_gather_widths(hlo: str) -> list[int]:
    """Element counts of every all-gather result in compiled HLO text."""
    shapes = re.findall(r"= \w+\[([\d,]+)\][^=]*? all-gather\(", hlo)
    return [int(np.prod([int(d) for d in s.split(",")])) for s in shapes]


def check_sampler(mesh):
    logits = jax.random.normal(jax.random.key(0), (B, V)) * 3
    history = jax.random.randint(jax.random.key(1), (B, 16), -1, V)
    split = jax.device_put(logits, NamedSharding(mesh, P("data", "model")))
    for config in CONFIGS:
        # Sharded, the rows off their candidates draw under the whole row's rule; on one
        # device those with only top-p/min-p draw by rejection (same distribution, other
        # tokens), except under `vmap` with shared logits, where they too draw by the rule.
        want = jax.vmap(lambda k, c=config: sample(k, logits, c, history))(jax.random.key(2)[None])
        want = jax.tree.map(lambda x: x[0], want)
        got = sharded_sample(mesh, jax.random.key(2), split, config, history)
        np.testing.assert_array_equal(got.token_id, want.token_id)
        np.testing.assert_array_equal(got.top_token_ids, want.top_token_ids)
        np.testing.assert_allclose(got.all_probabilities, want.all_probabilities, atol=1e-6)
        np.testing.assert_allclose(got.logprob, want.logprob, atol=1e-5)
        assert got.all_probabilities.sharding.spec == P("data", "model")
        hlo = sharded_sample.lower(mesh, jax.random.key(2), split, config, history).compile().as_text()
        widths = all_gather_widths(hlo)
        assert widths and max(widths) < B * V // 8, widths  # candidates/histograms only, never [B, V]
    print("sampler: equal to one device; largest all-gather", max(widths), "elements of", B * V)


def check_generation(mesh):
    vocab = 2048  # > devices * num_candidates, so gathering candidates is not gathering V
    target, draft = random_markov_model(vocab, 0), random_markov_model(vocab, 1)
    layered = random_markov_model(vocab, 2, num_layers=2)
    by_vocab = NamedSharding(mesh, P(None, "model"))
    prompt = jnp.tile(jnp.array([[1, 2, 3]]), (B, 1))
    split_prompt = jax.device_put(prompt, NamedSharding(mesh, P("data")))
    for config in (SamplingConfig(temperature=0.0), CONFIGS[0], CONFIGS[-1]):
        common = dict(key=jax.random.key(3), config=config, max_new_tokens=10)
        want = generate(target, prompt, **common).tokens
        got = generate(jax.device_put(target, by_vocab), split_prompt, mesh=mesh, **common).tokens
        np.testing.assert_array_equal(got, want)
    for config in (CONFIGS[0],):  # XLA partitions these programs itself; equality is the point
        common = dict(key=jax.random.key(3), config=config, max_new_tokens=10)
        want = speculative_generate(target, draft, prompt, **common).tokens
        got = speculative_generate(
            jax.device_put(target, by_vocab), jax.device_put(draft, by_vocab), split_prompt, **common
        ).tokens
        np.testing.assert_array_equal(got, want)
        want = self_speculative_generate(layered, prompt, early_exit_layer=1, **common).tokens
        got = self_speculative_generate(
            jax.device_put(layered, by_vocab), split_prompt, early_exit_layer=1, **common
        )
        np.testing.assert_array_equal(got.tokens, want)
    # The decode step of `generate` with a mesh gathers no [B, V] logits either.
    sharded_target = jax.device_put(target, by_vocab)

    def sharded_generate(model, prompt, key):
        return generate(model, prompt, key=key, config=CONFIGS[0], max_new_tokens=10, mesh=mesh).tokens

    hlo = jax.jit(sharded_generate).lower(sharded_target, split_prompt, jax.random.key(3)).compile().as_text()
    widths = all_gather_widths(hlo)
    assert not widths or max(widths) < B // 2 * vocab, widths  # less than one device's rows of V
    print("generation: generate, speculative and self-speculative equal to one device")


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    check_sampler(mesh)
    check_generation(mesh)
    print("sharded checks passed")
