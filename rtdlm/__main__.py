r"""Command line: python -m rtdlm {generate,train,bench}

examples:
  python -m rtdlm generate --prompt 'def fib(n):\n    ' --preset balanced --max-new-tokens 200
  python -m rtdlm generate --prompt 'import os\n' --speculative draft --num-speculative-tokens 4
  python -m rtdlm generate --prompt 'class Parser:\n' --speculative self --early-exit-layer 2
  python -m rtdlm generate --prompt 'a = 1\nb = 2\na = 1\n' --speculative lookup --ngram-size 3
  python -m rtdlm generate --prompt 'x = ' --regex '[0-9]{1,4}( [+*-] [0-9]{1,4})*'  # constrained
  python -m rtdlm generate --prompt 'data = ' --json-schema schema.json --batch 4
  python -m rtdlm generate --model-dir path/to/checkpoint --prompt 'def fibonacci(n):'  # Hugging Face
  python -m rtdlm train --config configs/models/tiny.yaml      # seconds; writes runs/tiny/
  python -m rtdlm train --config configs/models/target.yaml    # about an hour on 2 CPU cores
  python -m rtdlm bench sampler --quick                        # writes runs/benchmarks/

`python -m rtdlm COMMAND --help` describes each command. Input errors are reported in one
line, with exit status 2, before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import runpy
import sys
import time
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_WEIGHTS = _PACKAGE / "models" / "weights"  # = rtdlm.models.transformer.WEIGHTS_DIR, without importing JAX
_BENCHMARKS = _PACKAGE.parent / "benchmarks"
_BENCHMARK_NAMES = ("sampler", "decode", "speculative")
_PRESETS = ("creative", "precise", "balanced", "deterministic")
_USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """Reports a usage error in one line that names the (sub)command and its --help."""

    def error(self, message):
        message = " ".join(str(message).split())
        self.exit(_USAGE_ERROR, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def _number(kind, minimum=None, maximum=None, *, above=None, name="a number"):
    """An argparse type: `kind(text)` within the given bounds, else a one-line error."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum) or (
            above is not None and value <= above
        ):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 1, name="an integer >= 1")
_non_negative_int = _number(int, 0, name="an integer >= 0")


# ----------------------------------------------------------------------------
# generate


def _model_file(name_or_path: str) -> Path | None:
    """The checkpoint file `rtdlm.models.load_model(name_or_path)` would read, or None."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = _WEIGHTS / f"{name_or_path}.msgpack"
    return bundled if bundled.is_file() else None


def _model_num_layers(path: Path) -> int:
    """`num_layers` from a checkpoint's stored config, read without loading its weights."""
    import msgpack  # a flax dependency; reads the file's leading config, not the weights

    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "config":
                return int(unpacker.unpack()["num_layers"])
            unpacker.skip()
    raise ValueError("no model config in the file")


def _read_checkpoint_config(parser: argparse.ArgumentParser, flag: str, directory: str) -> dict:
    """A Hugging Face checkpoint directory's config.json (and that it has a tokenizer.json
    where one is needed), checked without JAX."""
    path = Path(directory)
    if not path.is_dir():
        parser.error(f"{flag} {directory!r}: no such directory (a Hugging Face checkpoint: config.json, "
                     f"*.safetensors, tokenizer.json)")
    if not (path / "config.json").is_file():
        parser.error(f"{flag} {directory!r}: no config.json there (not a Hugging Face checkpoint)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        parser.error(f"{flag} {directory!r}: config.json is not readable JSON ({error})")
    if not isinstance(config, dict):
        parser.error(f"{flag} {directory!r}: config.json is not a JSON object")
    if flag == "--model-dir" and not (path / "tokenizer.json").is_file():
        parser.error(f"{flag} {directory!r}: no tokenizer.json there (the prompt is encoded with it)")
    return config


def _check_checkpoint_args(parser: argparse.ArgumentParser, args) -> None:
    """--model-dir [--draft-dir | --speculative self]: the checks that need no JAX."""
    if args.draft_dir is not None:
        if args.speculative == "self":
            parser.error("--draft-dir and --speculative self exclude each other")
        args.speculative = "draft"
    elif args.speculative == "draft":
        parser.error("--speculative draft with --model-dir needs --draft-dir PATH (a second checkpoint)")
    config = _read_checkpoint_config(parser, "--model-dir", args.model_dir)
    if args.draft_dir is not None:
        _read_checkpoint_config(parser, "--draft-dir", args.draft_dir)
    if args.speculative == "self":
        num_layers = config.get("num_hidden_layers")
        if not isinstance(num_layers, int):
            parser.error(f"--model-dir {args.model_dir!r}: config.json has no num_hidden_layers")
        if not 1 <= args.early_exit_layer < num_layers:
            parser.error(
                f"--early-exit-layer must be in 1..{num_layers - 1} for --model-dir {args.model_dir!r} "
                f"({num_layers} layers), got {args.early_exit_layer}"
            )


def _check_constraint_args(parser: argparse.ArgumentParser, args) -> None:
    """--regex / --json-schema: the bundled model only; the schema file is readable JSON."""
    flag = "--regex" if args.regex is not None else "--json-schema"
    if args.model_dir is not None:
        parser.error(f"{flag} works with the bundled byte-level models, not with --model-dir")
    if args.json_schema is not None:
        try:
            args.json_schema_text = Path(args.json_schema).read_text(encoding="utf-8")
            json.loads(args.json_schema_text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            parser.error(f"--json-schema {args.json_schema!r}: not a readable JSON file ({error})")


def _constraint(args):
    """The --regex / --json-schema processor over the byte vocabulary, or None."""
    if args.regex is None and args.json_schema is None:
        return None
    from rtdlm import constraints
    from rtdlm.models import EOS_ID, byte_vocabulary

    if args.regex is not None:
        return constraints.regex(args.regex, byte_vocabulary(), eos_token_id=EOS_ID)
    return constraints.json_schema(args.json_schema_text, byte_vocabulary(), eos_token_id=EOS_ID)


def _check_generate_args(parser: argparse.ArgumentParser, args) -> None:
    """Every check that needs no JAX; `parser.error` exits with one line."""
    if not args.prompt:
        parser.error("--prompt is empty: give the text the model should continue, e.g. --prompt 'def '")
    if args.num_beams > 1 and args.speculative != "none":
        parser.error("--num-beams and --speculative exclude each other")
    if args.regex is not None or args.json_schema is not None:
        _check_constraint_args(parser, args)
    if args.model_dir is not None:
        _check_checkpoint_args(parser, args)
        return
    if args.draft_dir is not None:
        parser.error("--draft-dir needs --model-dir (for the bundled models use --draft-model)")
    bundled = ", ".join(sorted(p.stem for p in _WEIGHTS.glob("*.msgpack")))
    models = [("--model", args.model)]
    if args.speculative == "draft":
        models.append(("--draft-model", args.draft_model))
    for flag, name in models:
        if _model_file(name) is None:
            parser.error(f"{flag} {name!r}: no such checkpoint file and no bundled model of that name "
                         f"(bundled: {bundled})")
    if args.speculative == "self":
        path = _model_file(args.model)
        try:
            num_layers = _model_num_layers(path)
        except Exception as error:  # any failure to read it means it is not a model file
            parser.error(f"--model {args.model!r}: {path} is not an rtdlm model file ({error})")
        if not 1 <= args.early_exit_layer < num_layers:
            parser.error(
                f"--early-exit-layer must be in 1..{num_layers - 1} for --model {args.model!r} "
                f"({num_layers} layers), got {args.early_exit_layer}"
            )


def _sampling_config(args):
    from rtdlm.sampling import PRESETS, SamplingConfig

    if args.preset:
        config = PRESETS[args.preset]()
    elif args.model_dir is not None and (Path(args.model_dir) / "generation_config.json").is_file():
        config = SamplingConfig.from_generation_config(args.model_dir)  # the checkpoint's defaults
    else:
        config = SamplingConfig()
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


def _print_logprobs(out, decode) -> None:
    """Row 0's tokens with their logprobs (the distribution each was drawn from), then each
    row's mean."""
    import numpy as np

    length = int(out.lengths[0])
    tokens, logprobs = np.asarray(out.tokens[0, :length]), np.asarray(out.logprobs[0, :length])
    print("token logprobs (row 0):")
    for token, logprob in zip(tokens, logprobs, strict=True):
        print(f"  {int(token):>6} {decode(np.array([token]))!r:<12} {logprob:9.4f}")
    lengths = np.maximum(np.asarray(out.lengths), 1)
    means = np.asarray(out.logprobs).sum(axis=1) / lengths
    print("mean logprob per row: " + ", ".join(f"{m:.4f}" for m in means))


def _beam_generate(args, model, prompt, config, eos, decode) -> int:
    """--num-beams K: beam search; prints each row's best beam, then all beams with scores."""
    import jax
    import numpy as np

    from rtdlm.decoding import beam_search

    run = lambda: beam_search(model, prompt, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                              eos_token_id=eos, config=config)
    jax.block_until_ready(run().tokens)  # compiles; the timed run below reuses the program
    start = time.perf_counter()
    out = run()
    jax.block_until_ready(out.tokens)
    seconds = time.perf_counter() - start
    tokens, scores, lengths = (np.asarray(x) for x in (out.tokens, out.scores, out.lengths))
    print(args.prompt + decode(tokens[0, 0, : lengths[0, 0]]))
    print(f"\n[beam search, {args.num_beams} beams, {args.batch} row{'s' if args.batch > 1 else ''}: "
          f"{seconds:.2f} s, compile excluded]")
    for row in range(args.batch):
        for beam in range(args.num_beams):
            text = decode(tokens[row, beam, : lengths[row, beam]])
            print(f"--- row {row} beam {beam} score {scores[row, beam]:.4f} ---\n{args.prompt}{text}")
    return 0


def _generate(args) -> int:
    import jax
    import numpy as np

    from rtdlm.decoding import (
        generate,
        prompt_lookup_generate,
        self_speculative_generate,
        speculative_generate,
    )
    from rtdlm.models import EOS_ID, decode, encode, from_pretrained, load_model, load_tokenizer

    config = _sampling_config(args)
    checkpoint = args.model_dir is not None
    if checkpoint:
        tokenizer = load_tokenizer(args.model_dir)
        model = from_pretrained(args.model_dir, dtype=args.dtype)
        load_draft = lambda: from_pretrained(args.draft_dir, dtype=args.dtype)
        decode = lambda ids: tokenizer.decode(ids)
        prompt = np.tile(tokenizer.encode(args.prompt)[None], (args.batch, 1))
        eos = tokenizer.eos_token_id  # a checkpoint's rows always stop at its EOS
        draft_name = args.draft_dir
    else:
        model = load_model(args.model)
        load_draft = lambda: load_model(args.draft_model)
        prompt = np.tile(encode(args.prompt)[None], (args.batch, 1))
        eos = EOS_ID if args.stop_at_eos else None
        draft_name = args.draft_model
    common = dict(key=jax.random.key(args.seed), config=config, max_new_tokens=args.max_new_tokens,
                  eos_token_id=eos)
    if args.num_beams > 1:
        return _beam_generate(args, model, prompt, config, eos, decode)
    if args.stop:  # stop texts as token ids (a checkpoint's without its BOS)
        encode_text = (lambda t: tokenizer.encode(t, add_special_tokens=False)) if checkpoint else encode
        common["stop_sequences"] = [list(map(int, encode_text(text))) for text in args.stop]
    constraint = _constraint(args)
    if constraint is not None:  # constrained rows stop at EOS (allowed once the output matches)
        from rtdlm.sampling import DEFAULT_PROCESSORS, chain

        common.update(eos_token_id=EOS_ID, processors=chain(constraint, DEFAULT_PROCESSORS))
        decode = lambda ids, decode_bytes=decode: decode_bytes(ids[ids != EOS_ID])
    # No stream callback: a program with host callbacks is never written to the persistent
    # compilation cache, and with the cache a second run starts in about a second.
    if args.speculative == "none":
        run = lambda: generate(model, prompt, **common)
        what = ""
    elif args.speculative == "draft":
        draft = load_draft()
        run = lambda: speculative_generate(
            model, draft, prompt, num_speculative_tokens=args.num_speculative_tokens, **common
        )
        what = f"draft model {draft_name!r}"
    elif args.speculative == "lookup":
        run = lambda: prompt_lookup_generate(
            model,
            prompt,
            num_speculative_tokens=args.num_speculative_tokens,
            ngram_size=args.ngram_size,
            **common,
        )
        what = f"prompt lookup, n-grams up to {args.ngram_size}"
    else:
        run = lambda: self_speculative_generate(
            model,
            prompt,
            early_exit_layer=args.early_exit_layer,
            num_speculative_tokens=args.num_speculative_tokens,
            **common,
        )
        what = f"early exit at layer {args.early_exit_layer}"

    start = time.perf_counter()
    jax.block_until_ready(run().tokens)  # compiles; the timed run below reuses the program
    compile_seconds = time.perf_counter() - start
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    out = run()
    jax.block_until_ready(out.tokens)
    seconds = time.perf_counter() - start
    print(decode(np.asarray(out.tokens[0, : int(out.lengths[0])])))
    new_tokens = int(np.asarray(out.lengths).sum())
    summary = (
        f"{new_tokens} tokens ({args.batch} row{'s' if args.batch > 1 else ''}) in {seconds:.2f} s: "
        f"{new_tokens / max(seconds, 1e-9):.1f} tokens/s, prefill included, compile excluded "
        f"(first run {compile_seconds:.1f} s: compile or cache load, prefill, generation)"
    )
    if args.speculative != "none":
        accepted = np.asarray(out.num_accepted).sum() / max(1, np.asarray(out.num_drafted).sum())
        summary += f"; drafts accepted {accepted:.0%} ({what})"
    print(f"\n[{summary}]")
    if args.logprobs:
        _print_logprobs(out, decode)
    for row in range(1, args.batch):
        text = decode(np.asarray(out.tokens[row, : int(out.lengths[row])]))
        print(f"--- row {row} ---\n{args.prompt}{text}")
    return 0


# ----------------------------------------------------------------------------
# train


def _read_train_config(parser: argparse.ArgumentParser, args) -> dict:
    """The YAML file's contents, checked as far as that needs no JAX."""
    import yaml

    path = Path(args.config)
    if not path.is_file():
        parser.error(f"--config {args.config!r}: no such file (the configs are configs/models/*.yaml)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        parser.error(f"--config {args.config!r}: not a readable YAML file ({error})")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        parser.error(f"--config {args.config!r}: needs a 'model:' section (see configs/models/*.yaml)")
    if args.export_bundled and not config.get("bundled_export"):
        parser.error(f"--export-bundled: {args.config!r} names no 'bundled_export:' path")
    return config


def _train(parser: argparse.ArgumentParser, args) -> int:
    config = _read_train_config(parser, args)
    from rtdlm.models import train as train_lib

    try:
        train_lib.check_config(config)
    except (TypeError, ValueError) as error:
        parser.error(f"--config {args.config!r}: {error}")
    result = train_lib.train(
        config,
        output_dir=args.output_dir,
        steps=args.steps,
        resume=args.resume,
        export=args.export,
        export_bundled=args.export_bundled,
        progress=not args.no_progress,
    )
    final = result.log["final"]
    print(json.dumps({
        "name": result.log["name"],
        "output_dir": result.log["output_dir"],
        "val_bpb": final["val_bpb"],
        "val_bpb_per_exit": final["val_bpb_per_exit"],
        "train_wall_time_s": round(result.log["train_wall_time_s"], 1),
    }))
    return 0


# ----------------------------------------------------------------------------
# bench


def _bench(parser: argparse.ArgumentParser, name: str, options: list[str]) -> int:
    script = _BENCHMARKS / f"{name}.py"
    if not script.is_file():
        parser.error(f"{script} not found: the benchmarks live in a source checkout of rtdlm")
    sys.argv = [str(script), *options]
    runpy.run_path(str(script), run_name="__main__")
    return 0


# ----------------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (rich's progress bar swaps it while it draws)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _compile_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rtdlm" / "jax"


def _use_compile_cache(enabled: bool) -> None:
    """JAX's persistent compilation cache under the user's cache directory, so a second run
    loads its programs instead of compiling them. Off with --no-compile-cache or
    RTDLM_NO_COMPILE_CACHE=1 (the test suite sets it); a JAX cache directory configured
    by the user (JAX_COMPILATION_CACHE_DIR) is left as it is."""
    if not enabled or os.environ.get("RTDLM_NO_COMPILE_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(_compile_cache_dir()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _show_library_logs() -> None:
    """The library logs to `logging.getLogger("rtdlm")`; the CLI shows its INFO lines."""
    logger = logging.getLogger("rtdlm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(module)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a dependency's logging.basicConfig() would print every line twice


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = _Parser(
        prog="python -m rtdlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,train,bench}")

    gen = commands.add_parser(
        "generate",
        help="generate text with the bundled byte-level model or a Hugging Face checkpoint",
        description="Continue a prompt with the bundled model or a --model-dir checkpoint (plain, "
        "draft-model speculative or "
        "early-exit self-speculative decoding) and report tokens/s.",
    )
    gen.add_argument("--prompt", default=r"def fib(n):\n    ",
                     help=r"text to continue; \n and \t are read as escapes "
                          r"(default: 'def fib(n):\n' and 4 spaces)")
    gen.add_argument("--preset", choices=_PRESETS,
                     help="sampling preset; the options below override its values "
                          "(default: SamplingConfig(), i.e. temperature 1.0, no filters)")
    gen.add_argument("--temperature", type=_number(float, 0, name="a number >= 0"),
                     help="0 is greedy (default: the preset's, else 1.0)")
    gen.add_argument("--top-k", type=_non_negative_int, help="keep the k most probable tokens; 0 is off "
                                                            "(default: the preset's, else off)")
    gen.add_argument("--top-p", type=_number(float, maximum=1, above=0, name="a number in (0, 1]"),
                     help="nucleus: the smallest set with this mass (default: the preset's, else 1.0 = off)")
    gen.add_argument("--min-p", type=_number(float, 0, 1, name="a number in [0, 1]"),
                     help="drop tokens below min-p times the top probability "
                          "(default: the preset's, else 0 = off)")
    gen.add_argument("--repetition-penalty", type=_number(float, above=0, name="a number > 0"),
                     help="HF-style penalty on tokens already seen (default: the preset's, else 1.0 = off)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=200,
                     help="tokens (bytes) to generate per row (default: %(default)s)")
    gen.add_argument("--batch", type=_positive_int, default=1,
                     help="rows generated together from the same prompt (default: %(default)s)")
    gen.add_argument("--seed", type=_non_negative_int, default=0, help="PRNG seed (default: %(default)s)")
    gen.add_argument("--model", default="target",
                     help="bundled model name or checkpoint file path (default: %(default)s)")
    gen.add_argument("--speculative", choices=["none", "draft", "self", "lookup"], default="none",
                     help="draft: speculative decoding with --draft-model; self: early exit at "
                          "--early-exit-layer drafts for the full model; lookup: the tokens that "
                          "followed the last n-gram's latest earlier occurrence in the prompt and "
                          "output are the drafts (default: %(default)s)")
    gen.add_argument("--draft-model", default="draft",
                     help="draft model for --speculative draft (default: %(default)s)")
    gen.add_argument("--early-exit-layer", type=_positive_int, default=2,
                     help="draft layer for --speculative self, 1..num_layers-1 (default: %(default)s)")
    gen.add_argument("--ngram-size", type=_positive_int, default=3,
                     help="longest n-gram --speculative lookup matches (default: %(default)s)")
    gen.add_argument("--num-speculative-tokens", type=_positive_int, default=4,
                     help="draft tokens per verification step (default: %(default)s)")
    gen.add_argument("--num-beams", type=_positive_int, default=1,
                     help="beam search with this many beams (Hugging Face semantics; sampling options are "
                          "ignored); prints the best beam, then every beam with its score (default: 1, off)")
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="end a row once it generates TEXT (repeatable; the stop is printed)")
    gen.add_argument("--logprobs", action="store_true",
                     help="print each token of row 0 with its log-probability, and each row's mean")
    gen.add_argument("--stop-at-eos", action="store_true",
                     help="stop a row at the end-of-document byte (default: generate all tokens; "
                          "a --model-dir checkpoint always stops at its tokenizer's EOS)")
    constrained = gen.add_mutually_exclusive_group()
    constrained.add_argument("--regex", metavar="PATTERN",
                             help="constrain each row to a full match of PATTERN (rtdlm.constraints; "
                                  "the row stops at EOS once it matches)")
    constrained.add_argument("--json-schema", metavar="FILE",
                             help="constrain each row to a JSON document valid under the JSON schema in FILE")
    gen.add_argument("--model-dir", metavar="PATH",
                     help="a local Hugging Face Llama / Mistral / Qwen2 checkpoint directory (config.json, "
                          "*.safetensors, tokenizer.json) instead of --model; without --preset its "
                          "generation_config.json gives the sampling defaults")
    gen.add_argument("--draft-dir", metavar="PATH",
                     help="with --model-dir: a second checkpoint (same tokenizer) as the speculative draft")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="with --model-dir: cast the weights on load (default: as stored)")

    train = commands.add_parser(
        "train",
        help="train a model from a YAML config (rtdlm.models.train)",
        description="Train the reference byte-level transformer. Outputs (log.json, loss.png, orbax "
        "checkpoints, model.msgpack) go to runs/NAME/ or --output-dir; the bundled weights in "
        "rtdlm/models/weights/ change only with --export-bundled. configs/models/tiny.yaml runs in "
        "seconds; target.yaml takes about an hour on 2 CPU cores.",
    )
    train.add_argument("--config", required=True, help="YAML config, e.g. configs/models/tiny.yaml")
    train.add_argument("--output-dir", help="run folder (default: the config's output_dir, else runs/NAME)")
    train.add_argument("--steps", type=_positive_int, help="overrides train.steps (default: the config's)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in OUTPUT_DIR/checkpoints")
    train.add_argument("--export", metavar="PATH", help="also write a float16 copy of the final model here")
    train.add_argument("--export-bundled", action="store_true",
                       help="refresh the bundled float16 weights: write them to the config's "
                            "bundled_export path (rtdlm/models/weights/NAME.msgpack)")
    train.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")

    for command in (gen, train):
        command.add_argument("--no-compile-cache", action="store_true",
                             help="do not keep compiled programs in JAX's persistent cache "
                                  f"({_compile_cache_dir()}; also RTDLM_NO_COMPILE_CACHE=1)")

    bench = commands.add_parser(
        "bench",
        help="run benchmarks/NAME.py (source checkout only)",
        description="Run a benchmark script; the options after NAME are its own (`python -m rtdlm bench "
        "NAME --help`). Results go to runs/benchmarks/ unless --out PATH or --save-results "
        "(benchmarks/results/, the committed results the README quotes). --quick is a smoke run.",
    )
    bench.add_argument("name", choices=_BENCHMARK_NAMES, help="which benchmark")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="options for benchmarks/NAME.py")
    return parser, {"generate": gen, "train": train, "bench": bench}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = _parser()
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in _BENCHMARK_NAMES:
        return _bench(commands["bench"], argv[1], argv[2:])  # its --help is the script's
    args = parser.parse_args(argv)
    command = commands[args.command]
    if args.command == "bench":
        return _bench(command, args.name, args.options)
    _show_library_logs()
    _use_compile_cache(not args.no_compile_cache)
    if args.command == "train":
        return _train(command, args)
    args.prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    _check_generate_args(command, args)
    try:
        return _generate(args)
    except (ValueError, FileNotFoundError) as error:  # only the library checks it (e.g. weights)
        command.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
