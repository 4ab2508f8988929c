"""Decode-loop benchmark: `generate` against per-token Python loops, and sampling overhead.

1. tokens/s of `rtdlm.decoding.generate` (prefill + one compiled `lax.scan`) against two
   per-token Python loops on the same model and config: the guide's way (a jitted forward
   step, then `TokenSampler.sample(logits, config, token_history=[...])`, a host round
   trip per token) and a fused jitted step (forward + `sample` in one jit, tokens stay on
   the device). Bundled target model, B = 1 and 16, 128 new tokens, the balanced preset.
2. Sampling overhead inside a compiled decode step: a synthetic-size model (random
   weights, V = 32000), B = 8: step time with the full chain (temperature 0.7, top-k 50,
   top-p 0.9, min-p 0.05, repetition penalty 1.1) against the same step with a plain
   argmax, and against the forward pass alone. Twice: with LM-like logits (a random head
   giving logits of standard deviation 3; the JSON records their entropy and top-p set
   sizes) and with uniform logits (zero head), the filters' worst case: every token ties,
   so the chain takes its full-vocabulary path.

Usage: python benchmarks/decode.py [--quick] [--out PATH | --save-results]
(default output: runs/benchmarks/decode-<device>.json; --save-results: benchmarks/results/)
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import (  # noqa: E402
    add_output_arguments,
    environment,
    output_path,
    ratio,
    summarize,
    time_interleaved,
    write_json,
)
from rtdlm.decoding import generate  # noqa: E402
from rtdlm.decoding.common import emit_accepted  # noqa: E402
from rtdlm.decoding.model import prefill_prompt  # noqa: E402
from rtdlm.models import create_model, encode, load_model  # noqa: E402
from rtdlm.sampling import (  # noqa: E402
    DEFAULT_PROCESSORS,
    SamplingConfig,
    TokenSampler,
    chain,
    create_sampling_config_balanced,
    no_repeat_ngram,
    sample,
)

PROMPT = "import os\n\n\ndef main(argv):\n    "


def python_loops(model, prompt, config, max_new_tokens):
    """The two per-token Python loops; each returns a callable producing [B, N] tokens."""
    batch, prompt_len = prompt.shape

    @jax.jit
    def prefill(model, prompt):
        logits, cache = prefill_prompt(model, prompt, prompt_len + max_new_tokens)
        return logits[:, -1], cache

    # The cache (and the processors' state) are donated, so XLA updates them in place.
    @functools.partial(jax.jit, donate_argnames="cache")
    def forward(model, token, position, cache):
        logits, cache = model(token[:, None], jnp.full((batch, 1), position), cache)
        return logits[:, -1], cache

    @functools.partial(jax.jit, donate_argnames=("state", "cache"))
    def fused_step(model, key, logits, state, position, cache, config):
        token = sample(key, logits, config, state=state).token_id
        state = DEFAULT_PROCESSORS.update(state, token, jnp.ones(batch, bool), config)
        logits, cache = model(token[:, None], jnp.full((batch, 1), position), cache)
        return token, logits[:, -1], state, cache

    def guide_loop():  # TokenSampler per row, history as Python lists (host sync per token)
        sampler = TokenSampler()
        logits, cache = prefill(model, prompt)
        history = [list(map(int, row)) for row in np.asarray(prompt)]
        out = []
        for t in range(max_new_tokens):
            tokens = [
                int(sampler.sample(logits[b], config, token_history=history[b]).token_id)
                for b in range(batch)
            ]
            for b in range(batch):
                history[b].append(tokens[b])
            out.append(tokens)
            logits, cache = forward(model, jnp.asarray(tokens, jnp.int32), prompt_len + t, cache)
        return np.asarray(out).T

    def fused_loop():  # one jitted step per token, no host sync until the end
        logits, cache = prefill(model, prompt)
        state = DEFAULT_PROCESSORS.init(prompt, jnp.full(batch, prompt_len), logits.shape[-1], config)
        key, out = jax.random.key(0), []
        for t in range(max_new_tokens):
            token, logits, state, cache = fused_step(
                model, jax.random.fold_in(key, t), logits, state, prompt_len + t, cache, config
            )
            out.append(token)
        return jnp.stack(out, 1)

    return guide_loop, fused_loop


def bench_generate(model, batches, max_new_tokens, repeats):
    config = create_sampling_config_balanced()
    rows = []
    for batch in batches:
        prompt = jnp.asarray(np.tile(encode(PROMPT)[None], (batch, 1)))
        guide_loop, fused_loop = python_loops(model, prompt, config, max_new_tokens)
        run_generate = functools.partial(
            generate, model, prompt, key=jax.random.key(1), config=config, max_new_tokens=max_new_tokens
        )
        programs = {"generate": lambda run=run_generate: run().tokens, "python_loop_fused_jit": fused_loop}
        if batch == 1:  # the guide's TokenSampler loop is per row: too slow to run at B=16
            programs["python_loop_token_sampler"] = guide_loop
        seconds = time_interleaved(programs, repeats=repeats)
        tokens = batch * max_new_tokens
        row = {"batch": batch, "new_tokens": max_new_tokens}
        for name, values in seconds.items():
            row[name] = {
                **summarize(values, max_new_tokens),
                "tokens_per_s": tokens / float(np.median(values)),
            }
        for name in programs:
            if name != "generate":
                row[f"speedup_vs_{name}"] = ratio(seconds[name], seconds["generate"])
        rows.append(row)
        print(f"B={batch}: " + ", ".join(f"{n} {row[n]['tokens_per_s']:.0f} tok/s" for n in programs))
    return rows


def bench_processor_state(model, batch, max_new_tokens, repeats, window=64):
    """`generate` with the default chain vs the default chain plus a processor whose state is
    a `[B, window]` ring buffer of recent tokens (`no_repeat_ngram(3, window)`), interleaved."""
    config = create_sampling_config_balanced()
    prompt = jnp.asarray(np.tile(encode(PROMPT)[None], (batch, 1)))
    with_ring_buffer = chain(DEFAULT_PROCESSORS, no_repeat_ngram(3, window))

    def program(processors):
        run = functools.partial(
            generate,
            model,
            prompt,
            key=jax.random.key(1),
            config=config,
            max_new_tokens=max_new_tokens,
            processors=processors,
        )
        return lambda: run().tokens

    programs = {
        "default_processors": program(DEFAULT_PROCESSORS),
        f"ring_buffer_{window}": program(with_ring_buffer),
    }
    seconds = time_interleaved(programs, repeats=repeats)
    row = {name: summarize(values, max_new_tokens) for name, values in seconds.items()}
    extra = ratio(seconds[f"ring_buffer_{window}"], seconds["default_processors"])
    row.update(batch=batch, new_tokens=max_new_tokens, step_time_ratio=extra)
    print(
        f"B={batch}: a [B, {window}] ring-buffer processor: step time x{extra['ratio']:.3f} "
        f"(fastest calls x{extra['ratio_of_min']:.3f})"
    )
    return row


def bench_output_cost(model, batch, max_new_tokens, repeats):
    """`generate` as it is (processed logprobs are always recorded) vs with k=5 top logprobs,
    raw logprobs, and 4 stop sequences of 4 tokens per row (never matched: full-length rows,
    so every variant does the same work), interleaved in one run."""
    config = create_sampling_config_balanced()
    prompt = jnp.asarray(np.tile(encode(PROMPT)[None], (batch, 1)))
    stops = [[250, 251, 252, 253 - i] for i in range(4)]  # bytes the model never emits

    def program(**kwargs):
        run = functools.partial(
            generate,
            model,
            prompt,
            key=jax.random.key(1),
            config=config,
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
        return lambda: run().tokens

    programs = {
        "default": program(),
        "top_5_logprobs": program(num_top_logprobs=5),
        "raw_logprobs": program(logprobs_mode="raw"),
        "4_stop_sequences": program(stop_sequences=stops),
    }
    seconds = time_interleaved(programs, repeats=repeats)
    row = {name: summarize(values, max_new_tokens) for name, values in seconds.items()}
    row.update(batch=batch, new_tokens=max_new_tokens)
    for name in list(programs)[1:]:
        row[f"{name}_step_time_ratio"] = extra = ratio(seconds[name], seconds["default"])
        print(
            f"B={batch}: {name}: step time x{extra['ratio']:.3f} (fastest calls x{extra['ratio_of_min']:.3f})"
        )
    row["stop_check"] = check = stop_check_cost(batch, max_new_tokens, repeats)
    check["fraction_of_default_step"] = check["stop_sequences_us_per_step"] / row["default"]["us_per_step"]
    print(
        f"B={batch}: 4 stop sequences add {check['stop_sequences_us_per_step']:.1f} us to a "
        f"{row['default']['us_per_step']:.0f} us step ({100 * check['fraction_of_default_step']:.2f}%)"
    )
    return row


def stop_check_cost(batch, steps, repeats):
    """The stop-sequence check alone: `emit_accepted` (what each decode step runs to write its
    token) over `steps` tokens with and without 4 stop sequences of 4 tokens per row, in one
    compiled scan each. The difference per step is what stop sequences add to a step, too
    small to resolve in whole-generation timings on a noisy machine."""
    stop_ids = jnp.full((batch, 1), -1, jnp.int32)
    sequences = jnp.asarray(np.tile(np.array([[250, 251, 252, 253 - i] for i in range(4)]), (batch, 1, 1)))
    no_drafts, zeros = jnp.zeros((batch, 0), jnp.int32), jnp.zeros(batch, jnp.int32)

    def program(stop_sequences):
        @jax.jit
        def run(tokens):
            def step(carry, t):
                tokens, emitted, done, last = carry
                token = (t * 7 + jnp.arange(batch)) % 250  # [B], never a stop
                out = emit_accepted(
                    tokens, emitted, last, done, no_drafts, zeros, token, stop_ids, 0, stop_sequences
                )
                return (out.tokens, emitted + out.count, out.done, out.last), None

            return jax.lax.scan(step, (tokens, zeros, zeros.astype(bool), zeros), jnp.arange(steps))[0][0]

        tokens = jnp.zeros((batch, steps), jnp.int32)
        return lambda: run(tokens)

    seconds = time_interleaved({"without": program(None), "with": program(sequences)}, repeats=repeats)
    without, with_stops = (summarize(seconds[name], steps) for name in ("without", "with"))
    return {
        "emit_us_per_step_without_stop_sequences": without["us_per_step"],
        "emit_us_per_step_with_4_stop_sequences": with_stops["us_per_step"],
        "stop_sequences_us_per_step": with_stops["us_per_step"] - without["us_per_step"],
    }


def synthetic_model(model_config, vocab, logit_std):
    """A random-weight model of the given size whose logits have standard deviation `logit_std`.

    The head of a freshly initialised model is zero (uniform logits); a trained LM's logits
    are spread out, with a few tokens far above the rest. A normal head with standard
    deviation logit_std / sqrt(d_model) on the unit-RMS final norm gives logits with that
    spread. logit_std = 0 keeps the zero head: every row uniform, the worst case for the
    filters (every token ties, so top-k keeps them all and top-p needs the whole vocabulary).
    """
    model = create_model({**model_config, "vocab_size": vocab}, rngs=0)
    if logit_std:
        shape = model.head.kernel.shape
        scale = logit_std / np.sqrt(model_config["d_model"])
        model.head.kernel[...] = scale * jax.random.normal(jax.random.key(1), shape)
    return model


def logit_statistics(model, vocab, temperature=0.7, top_p=0.9):
    """Spread of the model's logits on random tokens: std, entropy at `temperature`, top-p size."""
    tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, vocab)
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    logits = model(tokens, positions, model.init_cache(8, 16))[0].reshape(-1, vocab)
    probs = np.sort(np.asarray(jax.nn.softmax(logits / temperature, axis=-1), np.float64), -1)[:, ::-1]
    nucleus = (np.cumsum(probs, -1) < top_p).sum(-1) + 1
    return {
        "logit_std": float(jnp.std(logits)),
        f"entropy_nats_at_t{temperature}": float(-(probs * np.log(probs + 1e-30)).sum(-1).mean()),
        f"top_p{top_p}_size_median": float(np.median(nucleus)),
        f"top_p{top_p}_size_max": int(nucleus.max()),
        "top_probability_mean": float(probs[:, 0].mean()),
    }


def bench_sampling_overhead(batch, vocab, steps, repeats, model_config, logit_std):
    model = synthetic_model(model_config, vocab, logit_std)
    chain = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
    cache_length = 64 + steps

    def decode_program(select):
        @jax.jit
        def run(model, config):
            cache = model.init_cache(batch, cache_length)
            no_prompt = jnp.zeros((batch, 0), jnp.int32)
            state = DEFAULT_PROCESSORS.init(no_prompt, jnp.zeros(batch, jnp.int32), vocab, config)

            def step(carry, t):
                token, state, cache = carry
                logits, cache = model(token[:, None], jnp.full((batch, 1), t), cache)
                token = select(jax.random.fold_in(jax.random.key(0), t), logits[:, -1], state, config)
                state = DEFAULT_PROCESSORS.update(state, token, jnp.ones(batch, bool), config)
                return (token, state, cache), None

            init = (jnp.zeros(batch, jnp.int32), state, cache)
            return jax.lax.scan(step, init, jnp.arange(steps))[0][0]

        return functools.partial(run, model, chain)

    programs = {
        "forward_only": decode_program(
            lambda key, logits, state, config: (jnp.sum(logits[:, :1], axis=-1) > 1e9).astype(jnp.int32)
        ),  # reads logits, no sampling
        "argmax": decode_program(lambda key, logits, state, config: jnp.argmax(logits, -1).astype(jnp.int32)),
        "full_chain": decode_program(
            lambda key, logits, state, config: sample(key, logits, config, state=state).token_id
        ),
    }
    seconds = time_interleaved(programs, repeats=repeats)
    result = {name: summarize(values, steps) for name, values in seconds.items()}
    chain_us, argmax_us = result["full_chain"]["us_per_step"], result["argmax"]["us_per_step"]
    result.update(
        batch=batch,
        vocab=vocab,
        steps=steps,
        model=model_config,
        head_logit_std=logit_std,
        logits=logit_statistics(model, vocab),
        sampling_overhead_vs_argmax=(chain_us - argmax_us) / chain_us,
        chain_config="temperature 0.7, top_k 50, top_p 0.9, min_p 0.05, repetition_penalty 1.1",
    )
    print(
        f"B={batch} V={vocab} logit std {logit_std}: step with chain {chain_us:.0f} us, with argmax "
        f"{argmax_us:.0f} us, forward only {result['forward_only']['us_per_step']:.0f} us -> "
        f"sampling overhead {result['sampling_overhead_vs_argmax']:.1%}"
    )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--only-output-cost",
        action="store_true",
        help="only the cost of logprobs, top logprobs and stop sequences (B=16, bundled model)",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.only_output_cost:
        outputs = bench_output_cost(load_model("target"), 16, max_new_tokens=128, repeats=args.repeats)
        env = environment()
        out = output_path(args, f"output-cost-{env['device_slug']}-b16.json")
        write_json(out, {"environment": env, "output_cost": outputs})
        print(f"wrote {out}")
        return

    synthetic = dict(d_model=512, num_layers=6, num_heads=8, mlp_dim=1408, attention_window=None)
    if args.quick:
        model = create_model("configs/models/tiny.yaml", rngs=0)
        gen = bench_generate(model, [1, 2], max_new_tokens=8, repeats=2)
        tiny = dict(d_model=32, num_layers=1, num_heads=2, mlp_dim=64, attention_window=None)
        overhead = {"lm_like_logits": bench_sampling_overhead(2, 1000, 8, 2, tiny, logit_std=3.0)}
        state = bench_processor_state(model, 2, max_new_tokens=8, repeats=2)
        outputs = bench_output_cost(model, 2, max_new_tokens=8, repeats=2)
    else:
        start = time.perf_counter()
        gen = bench_generate(load_model("target"), [1, 16], max_new_tokens=128, repeats=args.repeats)
        state = bench_processor_state(load_model("target"), 16, max_new_tokens=128, repeats=args.repeats)
        outputs = bench_output_cost(load_model("target"), 16, max_new_tokens=128, repeats=args.repeats)
        overhead = {
            name: bench_sampling_overhead(8, 32000, 32, args.repeats, synthetic, logit_std=std)
            for name, std in (("lm_like_logits", 3.0), ("uniform_logits_worst_case", 0.0))
        }
        print(f"total {time.perf_counter() - start:.0f} s")
    env = environment()
    out = output_path(args, f"decode-{env['device_slug']}{'-quick' if args.quick else ''}.json")
    write_json(
        out,
        {
            "environment": env,
            "generate_vs_python_loop": gen,
            "sampling_overhead": overhead,
            "processor_state_overhead": state,
            "output_cost": outputs,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
