"""Speculative decoding benchmark: acceptance, cost ratio, measured vs ideal speedup.

For each K (drafts per round), batch size and sampling mode it reports:
  acceptance_fraction   accepted / drafted draft tokens
  tokens_per_round      1 + accepted per round (each round emits its accepted drafts + 1)
  alpha     per-token acceptance rate of the i.i.d. model that yields the measured tokens
            per round: (1 - alpha^(K+1)) / (1 - alpha) = tokens_per_round. (The acceptance
            fraction underestimates it: drafts after a rejection are never tried.)
  c         draft step cost / target step cost, from plain `generate` on each drafter alone
  speedup   tokens/s of speculative decoding / tokens/s of `generate` (same model, config)
  ideal     (1 - alpha^(K+1)) / ((1 - alpha) (K c + 1)) = tokens_per_round / (K c + 1)
            (Leviathan et al. 2023); fraction_of_ideal = speedup / ideal
  v         verify cost: one verify pass over K+1 tokens / one 1-token target step (each
            timed alone, many in one scan). The ideal formula assumes v = 1, true where a
            step is bound by reading the weights (a GPU at small batch). On a CPU a (K+1)-row
            matmul costs more than a 1-row one (XLA runs it as a GEMM, not a GEMV), so the
            benchmark also reports ideal_at_measured_v = tokens_per_round / (K c + v), the
            fraction of that reached (what the decode loop itself loses), and the bound
            (K c + 1) / (K c + v) that v puts on fraction_of_ideal.
Programs are compiled before timing and timed interleaved in one process.

  python benchmarks/speculative.py            # bundled target + 1-layer draft model
  python benchmarks/speculative.py --self     # early exit of the bundled target as draft
  python benchmarks/speculative.py --memory-bound 1e9   # GPU: a memory-bound target
  python benchmarks/speculative.py --lookup   # prompt lookup (n-gram drafts, no draft model)

--lookup compares `prompt_lookup_generate` with `generate` on copy-heavy prompts (a function
then the same function renamed, a file past a repeated block) and on ordinary ones, and
times the n-gram search alone against a target step (c, its cost per round).

--memory-bound P widens the bundled target's MLPs with zero weights (`widen_mlp`) until it
has at least P parameters: its logits, and so alpha, stay the trained target's (to float
rounding) while every step reads P parameters, like a large model at small batch.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
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
    scan_program,
    summarize,
    time_interleaved,
    write_json,
)
from rtdlm.decoding import (  # noqa: E402
    generate,
    prompt_lookup_generate,
    self_speculative_generate,
    speculative_generate,
)
from rtdlm.decoding.common import bucketed_prompt, last_prompt_logits  # noqa: E402
from rtdlm.decoding.model import prefill_prompt  # noqa: E402
from rtdlm.decoding.prompt_lookup import lookup_drafts  # noqa: E402
from rtdlm.decoding.self_speculative import EarlyExit  # noqa: E402
from rtdlm.decoding.speculative import DraftModel  # noqa: E402
from rtdlm.models import create_model, encode, load_model, param_count, widen_mlp  # noqa: E402
from rtdlm.sampling import SamplingConfig  # noqa: E402

PROMPTS = [
    "import os\n\n\ndef main(argv):\n    ",
    "class Parser:\n    def __init__(self, text):\n",
    "    for key, value in sorted(items):\n",
    "def fib(n):\n    ",
]
_FUNCTION = (
    "def parse_header(line):\n"
    '    """Split a \'key: value\' header line into a (key, value) pair."""\n'
    '    key, _, value = line.partition(":")\n'
    "    key = key.strip().lower()\n"
    "    value = value.strip()\n"
    "    if not key:\n"
    '        raise ValueError("empty header name: %r" % line)\n'
    "    return key, value\n\n\n"
)
_BLOCK = "for name in sorted(names):\n    path = os.path.join(root, name)\n    if os.path.isdir(path):\n"
COPY_PROMPTS = [  # the output can copy long spans of its prompt
    _FUNCTION + "# The same function, renamed:\n\ndef split_header(line):\n",
    _FUNCTION + _FUNCTION.replace("parse_header", "read_header")[:90],
    "import os\n\n" + _BLOCK + "        walk(path)\n\n" + _BLOCK,
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n\n"
    "class Vector:\n    def __init__(self, x, y):\n",
]
MODES = {"greedy": SamplingConfig(temperature=0.0), "t0.7": SamplingConfig(temperature=0.7)}


def memory_bound_target(target, min_params: float):
    """`target` with its MLPs widened by zero weights to at least `min_params` parameters."""
    per_unit = target.num_layers * target.config.d_model * (3 if target.config.mlp_type == "swiglu" else 2)
    extra = max(0, -int(-(min_params - param_count(target)) // per_unit))
    return widen_mlp(target, target.config.mlp_dim + extra)


def prompt_batch(batch: int, prompts=PROMPTS):
    encoded = [encode(prompts[b % len(prompts)]) for b in range(batch)]
    width = max(len(e) for e in encoded)
    tokens = np.zeros((batch, width), np.int32)
    for b, e in enumerate(encoded):
        tokens[b, : len(e)] = e
    return jnp.asarray(tokens), jnp.asarray([len(e) for e in encoded], jnp.int32)


def iid_alpha(tokens_per_round: float, k: int) -> float:
    """The alpha with (1 - alpha^(K+1)) / (1 - alpha) = tokens_per_round (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid**i for i in range(k + 1)) < tokens_per_round:
            lo = mid
        else:
            hi = mid
    return lo


def add_derived(row: dict) -> dict:
    """Acceptance statistics, the ideal speedup and the fraction of it reached."""
    k = row["K"]
    row["tokens_per_round"] = 1 + row["acceptance_fraction"] * k
    row["alpha"] = iid_alpha(row["tokens_per_round"], k)
    row["ideal_speedup"] = row["tokens_per_round"] / (k * row["c"] + 1)
    row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
    if "verify_cost" in row:
        row["ideal_at_measured_v"] = row["tokens_per_round"] / (k * row["c"] + row["verify_cost"])
        row["fraction_of_ideal_at_measured_v"] = row["speedup"] / row["ideal_at_measured_v"]
        # The most of the v = 1 ideal any loop can reach at this v: (K c + 1) / (K c + v).
        row["fraction_of_ideal_bound_at_measured_v"] = row["ideal_at_measured_v"] / row["ideal_speedup"]
    return row


def verify_costs(drafting, models, target, ks, batch, repeats, steps=32, cache_length=160):
    """{K: v}: one `drafting.verify` pass over K+1 tokens / one 1-token target step."""
    one = jnp.zeros((batch, 1), jnp.int32)
    vocab = target.vocab_size

    def scanned(operand, init_caches, call, width):
        """`steps` calls of call(operand, caches, tokens [B, width], positions) in one scan;
        the operand (models) is traced, as in the decoders, not baked in as constants."""

        @jax.jit
        def run(operand):
            def step(caches, t):  # inputs depend on t, so XLA cannot hoist the pass
                tokens = jnp.broadcast_to((t + jnp.arange(width)) % vocab, (batch, width))
                positions = jnp.broadcast_to(16 + jnp.arange(width), (batch, width))
                logits, caches = call(operand, caches, tokens, positions)
                return caches, jnp.argmax(logits[:, -1], axis=-1)

            return jnp.sum(jax.lax.scan(step, init_caches(operand), jnp.arange(steps))[1])

        return functools.partial(run, operand)

    def verify(k):
        def call(models, caches, tokens, positions):
            # What the K draft steps would save for verification (zeros of its shape).
            one_step = jax.eval_shape(drafting.draft, models, caches, tokens[:, :1], positions[:, :1])
            saved = jax.tree.map(lambda a: jnp.zeros((k, *a.shape), a.dtype), one_step[2])
            return drafting.verify(models, caches, tokens, positions, saved)

        def prefilled_caches(models):
            return drafting.prefill(models, one, cache_length)[1]

        return scanned(models, prefilled_caches, call, k + 1)

    target_step = scanned(
        target,
        lambda model: model.init_cache(batch, cache_length),
        lambda model, cache, tokens, positions: model(tokens, positions, cache),
        1,
    )
    programs = {"step": target_step, **{f"K={k}": verify(k) for k in ks}}
    for program in programs.values():
        jax.block_until_ready(program())
    seconds = time_interleaved(programs, repeats)
    step_seconds = float(np.median(seconds["step"]))
    return {k: float(np.median(seconds[f"K={k}"])) / step_seconds for k in ks}


def measure(run_plain, run_draft_alone, runs_spec, batch, new_tokens, repeats, costs):
    """Times plain generate, the drafter alone and each K; returns per-K rows.

    costs: {K: verify cost v} from `verify_costs`.
    """
    programs = {
        "generate": run_plain,
        "draft_alone": run_draft_alone,
        **{f"K={k}": f for k, f in runs_spec.items()},
    }
    for program in programs.values():  # compile everything before timing
        jax.block_until_ready(program().tokens)
    seconds = time_interleaved({name: (lambda p=p: p().tokens) for name, p in programs.items()}, repeats)
    plain = float(np.median(seconds["generate"]))
    c = float(np.median(seconds["draft_alone"])) / plain
    rows = []
    for k, program in runs_spec.items():
        out = program()
        drafted, accepted = int(np.sum(out.num_drafted)), int(np.sum(out.num_accepted))
        rounds = drafted / (k * batch)  # per row, rows run in lockstep
        spec = float(np.median(seconds[f"K={k}"]))
        row = {
            "K": k,
            "batch": batch,
            "acceptance_fraction": accepted / max(drafted, 1),
            "c": c,
            "verify_cost": costs[k],
            "tokens_per_target_call": float(np.mean(np.asarray(out.lengths))) / (rounds + 1),
            "speedup": plain / spec,
            "tokens_per_s": batch * new_tokens / spec,
            "generate_tokens_per_s": batch * new_tokens / plain,
            "timing": summarize(seconds[f"K={k}"], new_tokens),
        }
        rows.append(add_derived(row))
        print(
            f"  K={k} B={batch}: alpha {row['alpha']:.2f}, c {c:.2f}, speedup {row['speedup']:.2f}x "
            f"(ideal {row['ideal_speedup']:.2f}x, {row['fraction_of_ideal']:.0%}; v {costs[k]:.2f}, "
            f"ideal at v {row['ideal_at_measured_v']:.2f}x, {row['fraction_of_ideal_at_measured_v']:.0%})",
            flush=True,
        )
    return rows


def draft_model_rows(target, draft, modes, ks, batches, new_tokens, repeats, on_group=lambda rows: None):
    rows = []
    for mode in modes:
        config = MODES[mode]
        for batch in batches:
            prompt, lengths = prompt_batch(batch)
            common = dict(
                key=jax.random.key(0), config=config, max_new_tokens=new_tokens, prompt_lengths=lengths
            )
            print(f"draft model, {mode}, B={batch}", flush=True)
            runs = {
                k: functools.partial(
                    speculative_generate, target, draft, prompt, num_speculative_tokens=k, **common
                )
                for k in ks
            }
            plain = functools.partial(generate, target, prompt, **common)
            draft_alone = functools.partial(generate, draft, prompt, **common)
            costs = verify_costs(DraftModel(), (target, draft), target, ks, batch, repeats)
            for row in measure(plain, draft_alone, runs, batch, new_tokens, repeats, costs):
                rows.append({"mode": mode, **row})
            on_group(rows)
    return rows


def self_rows(model, modes, exits, ks, new_tokens, repeats, on_group=lambda rows: None):
    rows = []
    prompt, lengths = prompt_batch(1)
    for mode in modes:
        config = MODES[mode]
        common = dict(key=jax.random.key(0), config=config, max_new_tokens=new_tokens, prompt_lengths=lengths)
        for exit_layer in exits:
            print(f"self-speculative, {mode}, exit layer {exit_layer}", flush=True)
            runs = {
                k: functools.partial(
                    self_speculative_generate,
                    model,
                    prompt,
                    early_exit_layer=exit_layer,
                    num_speculative_tokens=k,
                    **common,
                )
                for k in ks
            }
            plain = functools.partial(generate, model, prompt, **common)
            draft_alone = functools.partial(generate, _ExitAt(model, exit_layer), prompt, **common)
            costs = verify_costs(EarlyExit(exit_layer, True), model, model, ks, 1, repeats)
            for row in measure(plain, draft_alone, runs, 1, new_tokens, repeats, costs):
                rows.append({"mode": mode, "exit_layer": exit_layer, **row})
            on_group(rows)
    return rows


def search_cost(target, batch, width, ngram_size, k, repeats, steps=32):
    """One n-gram search over a [batch, width] context / one 1-token target step."""
    context = jnp.asarray(np.random.default_rng(0).integers(0, 16, (batch, width)), jnp.int32)
    length = jnp.full((batch,), width - 1, jnp.int32)

    def search(t, context, length):  # the context depends on t: no hoisting
        return lookup_drafts((context + t) % 16, length, ngram_size, k)[0]

    def step(t, model, cache):
        tokens = jnp.full((batch, 1), t % 256, jnp.int32)
        return jnp.argmax(model(tokens, tokens * 0 + 16, cache)[0][:, -1], axis=-1)

    cache = target.init_cache(batch, width)
    programs = {
        "search": functools.partial(scan_program(search, steps, context, length), context, length),
        "step": functools.partial(scan_program(step, steps, target, cache), target, cache),
    }
    seconds = time_interleaved(programs, repeats)
    return float(np.median(seconds["search"])) / float(np.median(seconds["step"]))


def prefill_program(model, prompt, lengths, new_tokens):
    """The prompt pass both decoders start with (the same bucketed prompt and cache), alone:
    `decode_speedup` compares the two after it, where drafting can help."""
    padded, _, cache_length = bucketed_prompt(prompt, new_tokens, getattr(model, "max_length", None))

    @jax.jit
    def prefill(model, padded):
        logits, _ = prefill_prompt(model, padded, cache_length)
        return last_prompt_logits(logits, lengths)

    return lambda: prefill(model, padded)


def decode_speedup(plain, spec, prefill):
    """generate's time over lookup's with the shared prefill taken out of both; None when the
    prefill, timed on its own, is not below both (timer noise on tiny runs)."""
    if prefill >= min(plain, spec):
        return None
    return (plain - prefill) / (spec - prefill)


def lookup_rows(
    target, modes, ks, batches, output_lengths, repeats, ngram_size=3, on_group=lambda rows: None
):
    """Prompt lookup vs generate per prompt set (copy-heavy, ordinary), output length, mode,
    batch and K."""
    rows = []
    prompt_sets = {"copy": COPY_PROMPTS, "ordinary": PROMPTS}
    for prompts_name, new_tokens, mode, batch in itertools.product(
        prompt_sets, output_lengths, modes, batches
    ):
        prompt, lengths = prompt_batch(batch, prompt_sets[prompts_name])
        common = dict(
            key=jax.random.key(0), config=MODES[mode], max_new_tokens=new_tokens, prompt_lengths=lengths
        )
        print(f"prompt lookup, {prompts_name} prompts, {new_tokens} tokens, {mode}, B={batch}", flush=True)
        programs = {"generate": functools.partial(generate, target, prompt, **common)}
        for k in ks:
            programs[f"K={k}"] = functools.partial(
                prompt_lookup_generate,
                target,
                prompt,
                num_speculative_tokens=k,
                ngram_size=ngram_size,
                **common,
            )
        outputs = {name: program() for name, program in programs.items()}  # compiles
        seconds = time_interleaved(
            {
                **{n: (lambda p=p: p().tokens) for n, p in programs.items()},
                "prefill": prefill_program(target, prompt, lengths, new_tokens),
            },
            repeats,
        )
        plain, prefill = float(np.median(seconds["generate"])), float(np.median(seconds["prefill"]))
        for k in ks:
            out = outputs[f"K={k}"]
            drafted, accepted = int(np.sum(out.num_drafted)), int(np.sum(out.num_accepted))
            same = bool(np.array_equal(out.tokens, outputs["generate"].tokens))
            spec = float(np.median(seconds[f"K={k}"]))
            row = {
                "prompts": prompts_name,
                "mode": mode,
                "batch": batch,
                "K": k,
                "ngram_size": ngram_size,
                "new_tokens": new_tokens,
                "acceptance_fraction": accepted / max(drafted, 1),
                "tokens_per_round": 1 + accepted / max(drafted, 1) * k,
                "speedup": plain / spec,
                "decode_speedup": decode_speedup(plain, spec, prefill),
                "prefill_fraction_of_generate": prefill / plain,
                "tokens_per_s": batch * new_tokens / spec,
                "generate_tokens_per_s": batch * new_tokens / plain,
                "same_tokens_as_generate": same,
                "timing": summarize(seconds[f"K={k}"], new_tokens),
                "generate_timing": summarize(seconds["generate"], new_tokens),
                "prefill_timing": summarize(seconds["prefill"], 1),
            }
            rows.append(row)
            print(
                f"  K={k}: accepted {row['acceptance_fraction']:.0%}, "
                f"{row['tokens_per_round']:.2f} tokens/round, speedup {row['speedup']:.2f}x "
                f"(decode alone {row['decode_speedup'] or float('nan'):.2f}x; "
                f"prefill {row['prefill_fraction_of_generate']:.0%} of generate)"
                f"{'' if same or mode != 'greedy' else ' (TOKENS DIFFER)'}",
                flush=True,
            )
        on_group(rows)
    return rows


def sharing_rows(model, exit_layer, k, new_tokens, repeats):
    """What reusing the draft's layers saves: shared-cache verify vs full recompute."""
    prompt, lengths = prompt_batch(1)
    common = dict(
        key=jax.random.key(0),
        config=MODES["greedy"],
        max_new_tokens=new_tokens,
        prompt_lengths=lengths,
        early_exit_layer=exit_layer,
        num_speculative_tokens=k,
    )
    programs = {
        share: (lambda s=share: self_speculative_generate(model, prompt, share_layers=s, **common).tokens)
        for share in (True, False)
    }
    for program in programs.values():
        jax.block_until_ready(program())
    same = bool(jnp.array_equal(programs[True](), programs[False]()))
    seconds = time_interleaved({str(s): p for s, p in programs.items()}, repeats)
    shared, full = float(np.median(seconds["True"])), float(np.median(seconds["False"]))
    print(
        f"sharing layers < {exit_layer}: {full / shared:.2f}x faster than full recompute "
        f"(same tokens: {same})"
    )
    return {
        "exit_layer": exit_layer,
        "K": k,
        "shared_s": shared,
        "full_recompute_s": full,
        "speedup_from_sharing": full / shared,
        "identical_tokens": same,
    }


class _ExitAt:
    """The model cut at `exit_layer` (the self-speculative draft alone), for timing c."""

    def __init__(self, model, exit_layer):
        self.model, self.exit_layer = model, exit_layer

    def init_cache(self, batch_size, max_length):
        return self.model.init_cache(batch_size, max_length)

    def __call__(self, tokens, positions, cache, exit_layer=None):
        return self.model(tokens, positions, cache, exit_layer=self.exit_layer)


jax.tree_util.register_pytree_node(
    _ExitAt,
    lambda m: ((m.model,), m.exit_layer),
    lambda exit_layer, children: _ExitAt(children[0], exit_layer),
)


def plot(rows, path, title, group_key):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({tuple(r[g] for g in group_key) for r in rows})
    for group in groups:
        sel = [r for r in rows if tuple(r[g] for g in group_key) == group]
        label = ", ".join(f"{g}={v}" for g, v in zip(group_key, group, strict=True))
        (line,) = ax.plot([r["K"] for r in sel], [r["speedup"] for r in sel], "o-", label=label)
        if "ideal_speedup" in sel[0]:  # prompt lookup has no draft cost model
            ax.plot([r["K"] for r in sel], [r["ideal_speedup"] for r in sel], ":", color=line.get_color())
        if "decode_speedup" in sel[0]:  # prompt lookup: the same runs with the prefill taken out
            decode = [np.nan if r["decode_speedup"] is None else r["decode_speedup"] for r in sel]
            ax.plot([r["K"] for r in sel], decode, "--", color=line.get_color())
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("K (draft tokens per round)")
    dotted = " (solid: measured, dotted: ideal)" if "ideal_speedup" in rows[0] else ""
    dashed = " (solid: end to end, dashed: after the prefill)" if "decode_speedup" in rows[0] else ""
    ax.set_ylabel("speedup over generate" + dotted + dashed)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--self", dest="self_spec", action="store_true", help="early-exit self-speculative mode"
    )
    parser.add_argument("--lookup", action="store_true", help="prompt lookup (n-gram drafts) vs generate")
    parser.add_argument("--ngram-size", type=int, default=3, help="--lookup: longest n-gram matched")
    parser.add_argument(
        "--lookup-lengths",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[128, 256],
        help="--lookup: new tokens per run (copying a whole function takes about 256)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny random models, for a smoke test")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 16])
    parser.add_argument(
        "--exit-layers",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[1, 2, 3, 4],
        help="--self: early-exit layers to try (the bundled target has 8 layers)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--modes",
        type=lambda t: t.split(","),
        default=list(MODES),
        help=f"sampling modes to run, from {','.join(MODES)}",
    )
    parser.add_argument(
        "--ks",
        type=lambda t: [int(x) for x in t.split(",")],
        help="draft lengths K to run (default 1..8, 1..6 with --self, 2,4,8 with --lookup)",
    )
    parser.add_argument(
        "--memory-bound",
        type=float,
        metavar="PARAMS",
        help="widen the target with zero weights to at least PARAMS parameters (e.g. 1e9)",
    )
    add_output_arguments(parser)
    parser.add_argument("--recompute", type=Path, help="re-derive alpha/ideal in a result JSON, replot")
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.modes) - set(MODES)):
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    if args.recompute:
        return recompute(args.recompute)

    env = environment()
    start = time.perf_counter()
    if args.quick:
        target = create_model("configs/models/tiny.yaml", rngs=0)
        draft = create_model({**_tiny(), "num_layers": 1}, rngs=1)
        ks, batches, exits, new_tokens, repeats = args.ks or [1, 2], [1, 2], [1], 8, 1
    else:
        target, draft = load_model("target"), load_model("draft")
        ks = args.ks or ([2, 4, 8] if args.lookup else list(range(1, 7 if args.self_spec else 9)))
        batches, new_tokens, repeats = args.batches, args.new_tokens, args.repeats
        exits = [e for e in args.exit_layers if 1 <= e < target.num_layers]
    trained_params = param_count(target)
    if args.memory_bound:
        target = memory_bound_target(target, args.memory_bound)
    name = ("self-speculative" if args.self_spec else "prompt-lookup" if args.lookup else "speculative") + (
        "-memory-bound" if args.memory_bound else ""
    )
    suffix = f"{name}-{env['device_slug']}{'-quick' if args.quick else ''}"
    out = output_path(args, f"{suffix}.json")

    def save_partial(rows):  # a run cut short (e.g. by a device time limit) keeps its rows
        write_json(out, {"environment": env, "rows": rows, "partial": True})

    if args.lookup:
        modes = args.modes if args.modes != list(MODES) else ["greedy"]
        lengths = [new_tokens] if args.quick else args.lookup_lengths
        rows = lookup_rows(target, modes, ks, batches, lengths, repeats, args.ngram_size, save_partial)
        width = max(prompt_batch(1, p)[0].shape[1] for p in (COPY_PROMPTS, PROMPTS)) + max(lengths)
        cost = {b: search_cost(target, b, width, args.ngram_size, max(ks), repeats) for b in batches}
        payload = {"environment": env, "rows": rows, "search_cost_per_round_vs_target_step": cost}
        print(f"n-gram search / target step: {cost}")
    elif args.self_spec:
        rows = self_rows(target, args.modes, exits, ks, new_tokens, repeats, save_partial)
        best = best_row(rows, self_spec=True)
        sharing = sharing_rows(target, best["exit_layer"], best["K"], new_tokens, repeats)
        payload = {"environment": env, "rows": rows, "best": best, "layer_sharing": sharing}
    else:
        rows = draft_model_rows(target, draft, args.modes, ks, batches, new_tokens, repeats, save_partial)
        payload = {"environment": env, "rows": rows, "best_b1": best_row(rows, self_spec=False)}
    payload["target"] = {
        "params": param_count(target),
        "trained_params": trained_params,
        "mlp_dim": target.config.mlp_dim,
        "construction": "bundled target, MLPs widened with zero weights (widen_mlp)"
        if args.memory_bound
        else "bundled target as trained",
    }
    payload["seconds_total"] = time.perf_counter() - start
    write_json(out, payload)  # before plotting: a machine without matplotlib keeps the numbers
    print(f"wrote {out} ({payload['seconds_total']:.0f} s)")
    plot_result(payload, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")


def best_row(rows, self_spec: bool) -> dict:
    """The fastest row (self-speculative), or the fastest B=1 row (draft model)."""
    return max((r for r in rows if self_spec or r["batch"] == 1), key=lambda r: r["speedup"])


def plot_result(payload, path: Path):
    """Speedup vs K: per exit layer for the first mode's rows (self-speculative), else per
    mode and batch size."""
    rows, device = payload["rows"], payload["environment"]["device_slug"]
    if "search_cost_per_round_vs_target_step" in payload:
        plot(rows, path, f"prompt lookup (n-gram drafts) - {device}", ["prompts", "new_tokens", "batch"])
    elif "layer_sharing" in payload:
        mode = rows[0]["mode"]
        title = f"self-speculative (early exit), B=1, {mode} - {device}"
        plot([r for r in rows if r["mode"] == mode], path, title, ["exit_layer"])
    else:
        plot(rows, path, f"speculative decoding, bundled draft - {device}", ["mode", "batch"])


def recompute(path: Path):
    """Re-derives the statistics of an existing result file (e.g. after a formula fix)."""
    payload = json.loads(path.read_text())
    for row in payload["rows"]:
        row.setdefault("acceptance_fraction", row.get("alpha"))
        add_derived(row)
    self_spec = "layer_sharing" in payload
    payload["best" if self_spec else "best_b1"] = best_row(payload["rows"], self_spec)
    write_json(path, payload)
    plot_result(payload, path.with_suffix(".png"))
    print(f"rewrote {path}")


def _tiny():
    import yaml

    return yaml.safe_load(Path("configs/models/tiny.yaml").read_text())["model"]


if __name__ == "__main__":
    main()
