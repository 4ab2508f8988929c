"""Constrained decoding cost (rtdlm.constraints) on the bundled byte model.

1. tokens/s of constrained vs free `generate` at B=1 and B=16 (interleaved, medians, ratio):
   every row runs all `--new-tokens` steps (no EOS stop), so both programs do the same
   number of steps and the difference is the masking and advancing.
2. automaton build time and device table bytes for 3 JSON schemas on the byte vocabulary
   and on the 32k byte-level BPE vocabulary (trained on the stdlib, cached under runs/).
3. constrained speculative speedup over constrained `generate` vs the unconstrained one
   (B=1, the bundled draft, K=4).

    python benchmarks/constrained.py [--quick] [--save-results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._timing import (  # noqa: E402
    add_output_arguments,
    environment,
    load_average,
    output_path,
    ratio,
    summarize,
    time_interleaved,
    write_json,
)
from rtdlm import constraints  # noqa: E402
from rtdlm.constraints import processor as processor_module  # noqa: E402
from rtdlm.decoding import generate, speculative_generate  # noqa: E402
from rtdlm.models import EOS_ID, byte_vocabulary, encode, load_model  # noqa: E402
from rtdlm.sampling import DEFAULT_PROCESSORS, SamplingConfig, chain  # noqa: E402

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["name", "n"],
    },
    "enums_arrays": {
        "type": "object",
        "properties": {
            "kind": {"enum": ["function", "class", "module"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
            "score": {"type": "number"},
            "public": {"type": "boolean"},
        },
        "required": ["kind", "tags"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "kind": {"enum": ["function", "class", "module"]},
            "line": {"type": "integer"},
            "args": {
                "type": "array",
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "default": {"type": ["integer", "null"]}},
                    "required": ["name"],
                },
            },
            "pos": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
            },
        },
        "required": ["name", "kind", "args", "pos"],
    },
}
# Code-like lines that rarely end within the run: the speculative comparison is not inflated
# by rows stuck in the end state (where every draft is the accepted EOS).
CODE_REGEX = r"(    [a-z_]+ = [a-z_0-9.(), ]{1,40}\n)+"


def build_rows(vocabularies):
    rows = []
    for vocab_name, (vocab, eos) in vocabularies.items():
        for name, schema in SCHEMAS.items():
            processor_module._regex_cached.cache_clear()
            start = time.perf_counter()
            c = constraints.json_schema(schema, vocab, eos_token_id=eos)
            seconds = time.perf_counter() - start
            tables = processor_module.tables_of(c)
            rows.append(
                {
                    "vocabulary": vocab_name,
                    "vocab_size": len(vocab),
                    "schema": name,
                    "build_s": round(seconds, 3),
                    "states": int(tables.allowed.shape[0]),
                    "transitions": int(tables.tokens.shape[0]),
                    "layout": "dense" if tables.next_dense is not None else "sorted lists",
                    "device_mb": round(tables.nbytes / 2**20, 3),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few tokens and repeats")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    new_tokens, repeats = (8, 1) if args.quick else (args.new_tokens, args.repeats)

    target, draft = load_model("target"), load_model("draft")
    byte_vocab = byte_vocabulary()
    schema_c = chain(
        constraints.json_schema(SCHEMAS["nested"], byte_vocab, eos_token_id=EOS_ID), DEFAULT_PROCESSORS
    )
    config = SamplingConfig(temperature=1.0)
    prompt_text = "import os\n\n\ndef main(argv):\n    "

    def prompt(batch):
        return jnp.asarray(np.tile(encode(prompt_text)[None], (batch, 1)))

    results = {"environment": environment(), "load_average_start": load_average(), "new_tokens": new_tokens}

    # 1. constrained vs free generate, every row all steps.
    step_rows = []
    for batch in (1, 16):
        p = prompt(batch)
        common = dict(key=jax.random.key(0), config=config, max_new_tokens=new_tokens)
        programs = {
            "free": lambda p=p, common=common: generate(target, p, **common).tokens,
            "constrained": lambda p=p, common=common: (
                generate(target, p, processors=schema_c, **common).tokens
            ),
        }
        seconds = time_interleaved(programs, repeats)
        free, cons = summarize(seconds["free"], new_tokens), summarize(seconds["constrained"], new_tokens)
        row = {
            "batch": batch,
            "free_tokens_per_s": batch * 1e6 / free["us_per_step"],
            "constrained_tokens_per_s": batch * 1e6 / cons["us_per_step"],
            "constrained_over_free_time": ratio(seconds["constrained"], seconds["free"]),
        }
        row["overhead_fraction_of_step"] = row["constrained_over_free_time"]["ratio"] - 1
        step_rows.append(row)
        print(row, flush=True)
    results["generate"] = step_rows

    # 2. build time and device memory.
    bpe_vocab = constraints.tokenizer_vocabulary(constraints.stdlib_bpe_tokenizer())
    results["build"] = build_rows({"bytes": (byte_vocab, EOS_ID), "bpe_32k": (bpe_vocab, 0)})

    # 3. speculative speedups, B=1, K=4, no EOS stop.
    code_c = chain(constraints.regex(CODE_REGEX, byte_vocab, eos_token_id=EOS_ID), DEFAULT_PROCESSORS)
    p = prompt(1)
    common = dict(key=jax.random.key(1), config=config, max_new_tokens=new_tokens)
    outs = {}

    def spec(processors):
        def run():
            out = speculative_generate(
                target, draft, p, num_speculative_tokens=4, processors=processors, **common
            )
            outs[processors is code_c] = out
            return out.tokens

        return run

    programs = {
        "generate_free": lambda: generate(target, p, **common).tokens,
        "speculative_free": spec(DEFAULT_PROCESSORS),
        "generate_constrained": lambda: generate(target, p, processors=code_c, **common).tokens,
        "speculative_constrained": spec(code_c),
    }
    seconds = time_interleaved(programs, repeats)
    free_speedup = ratio(seconds["generate_free"], seconds["speculative_free"])
    cons_speedup = ratio(seconds["generate_constrained"], seconds["speculative_constrained"])
    acceptance = {
        ("constrained" if k else "free"): float(np.sum(o.num_accepted) / max(1, np.sum(o.num_drafted)))
        for k, o in outs.items()
    }
    results["speculative"] = {
        "regex": CODE_REGEX,
        "k": 4,
        "batch": 1,
        "speedup_free": free_speedup,
        "speedup_constrained": cons_speedup,
        "kept_fraction_of_speedup": (cons_speedup["ratio"] - 1) / max(free_speedup["ratio"] - 1, 1e-9),
        "kept_ratio_of_speedups": cons_speedup["ratio"] / free_speedup["ratio"],
        "acceptance": acceptance,
    }
    print(results["speculative"], flush=True)
    results["load_average_end"] = load_average()
    path = write_json(output_path(args, "constrained.json"), results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
