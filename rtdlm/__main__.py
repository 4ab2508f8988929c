"""Command line: `python -m rtdlm {generate,train,bench}`.

python -m rtdlm generate --prompt 'def fib(n):\n    ' --preset balanced --max-new-tokens 200
python -m rtdlm generate --prompt 'import os\n' --speculative draft --num-speculative-tokens 4
python -m rtdlm train --config configs/models/target.yaml
python -m rtdlm bench sampler --quick
"""

from __future__ import annotations

import argparse
import codecs
import runpy
import sys
import time
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
_BENCHMARK_NAMES = ("sampler", "decode", "speculative")


def _sampling_config(args):
    from rtdlm.sampling import PRESETS, SamplingConfig

    config = PRESETS[args.preset]() if args.preset else SamplingConfig()
    overrides = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
    }
    overrides = {name: value for name, value in overrides.items() if value is not None}
    if overrides.get("temperature", 0.0) > 0:
        overrides["do_sample"] = True  # an explicit temperature overrides a greedy preset
    return config.replace(**overrides)


def _generate(args) -> int:
    import jax
    import numpy as np

    from rtdlm.decoding import generate, self_speculative_generate, speculative_generate
    from rtdlm.models import EOS_ID, decode, encode, load_model

    args.prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    config = _sampling_config(args)
    model = load_model(args.model)
    prompt = np.tile(encode(args.prompt)[None], (args.batch, 1))
    key = jax.random.key(args.seed)
    common = dict(
        key=key,
        config=config,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=EOS_ID if args.stop_at_eos else None,
    )
    print(args.prompt, end="", flush=True)

    if args.speculative == "none":
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        first_token_at = []

        def stream(step, tokens):  # row 0, as bytes arrive
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            print(decoder.decode(bytes([int(tokens[0]) & 0xFF])), end="", flush=True)

        start = time.perf_counter()
        out = generate(model, prompt, stream=stream, **common)
        jax.block_until_ready(out.tokens)
        end = time.perf_counter()
        print(decoder.decode(b"", final=True))
        steady = end - first_token_at[0]
        new_tokens = int(np.asarray(out.lengths).sum())
        print(
            f"\n[{new_tokens} tokens ({args.batch} rows): "
            f"{(new_tokens - args.batch) / max(steady, 1e-9):.1f} "
            f"tokens/s after the first token; compile + prefill {first_token_at[0] - start:.2f} s]"
        )
    else:
        if args.speculative == "draft":
            run = lambda: speculative_generate(
                model,
                load_model(args.draft_model),
                prompt,
                num_speculative_tokens=args.num_speculative_tokens,
                **common,
            )
        else:
            run = lambda: self_speculative_generate(
                model,
                prompt,
                early_exit_layer=args.early_exit_layer,
                num_speculative_tokens=args.num_speculative_tokens,
                **common,
            )
        jax.block_until_ready(run().tokens)  # compile
        start = time.perf_counter()
        out = run()
        jax.block_until_ready(out.tokens)
        seconds = time.perf_counter() - start
        print(decode(np.asarray(out.tokens[0, : int(out.lengths[0])])))
        new_tokens = int(np.asarray(out.lengths).sum())
        accepted = float(np.asarray(out.num_accepted).sum() / max(1, np.asarray(out.num_drafted).sum()))
        print(
            f"\n[{new_tokens} tokens ({args.batch} rows): {new_tokens / seconds:.1f} tokens/s, "
            f"{args.speculative} drafts accepted {accepted:.0%} (compile excluded)]"
        )
    for row in range(1, args.batch):
        print(
            f"--- row {row} ---\n{args.prompt}{decode(np.asarray(out.tokens[row, : int(out.lengths[row])]))}"
        )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rtdlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text with the bundled byte-level model")
    gen.add_argument("--prompt", default="def fib(n):\\n    ", help=r"text to continue (\n, \t are escapes)")
    gen.add_argument("--preset", choices=["creative", "precise", "balanced", "deterministic"])
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--batch", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--model", default="target", help="bundled model name or checkpoint path")
    gen.add_argument("--speculative", choices=["none", "draft", "self"], default="none")
    gen.add_argument("--draft-model", default="draft")
    gen.add_argument("--early-exit-layer", type=int, default=2)
    gen.add_argument("--num-speculative-tokens", type=int, default=4)
    gen.add_argument("--stop-at-eos", action="store_true", help="stop a row at the end-of-document byte")

    train = commands.add_parser("train", help="train a model (see rtdlm.models.train)", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    bench = commands.add_parser("bench", help="run benchmarks/<name>.py", add_help=False)
    bench.add_argument("name", choices=_BENCHMARK_NAMES)
    bench.add_argument("rest", nargs=argparse.REMAINDER)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its options belong to the trainer's own parser
        from rtdlm.models.train import train_main

        return train_main(argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in _BENCHMARK_NAMES:
        sys.argv = [str(_BENCHMARKS / f"{argv[1]}.py"), *argv[2:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    args = parser.parse_args(argv)
    if args.command == "generate":
        try:
            return _generate(args)
        except ValueError as error:
            parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
