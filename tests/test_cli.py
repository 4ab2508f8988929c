"""The command line: `python -m rtdlm generate|train|bench ...`."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rtdlm.__main__ import main

# Each bad input, and a word its one-line error must contain.
BAD_INPUTS = [
    (["generate", "--batch", "0"], "--batch"),
    (["generate", "--batch", "two"], "--batch"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "--num-speculative-tokens", "0"], "--num-speculative-tokens"),
    (["generate", "--speculative", "self", "--early-exit-layer", "8"], "1..7"),
    (["generate", "--speculative", "self", "--early-exit-layer", "0"], "--early-exit-layer"),
    (["generate", "--model", "no-such-model"], "no-such-model"),
    (["generate", "--speculative", "draft", "--draft-model", "nope"], "--draft-model"),
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate", "--top-p", "0"], "--top-p"),
    (["generate", "--temperature", "nan"], "--temperature"),
    (["generate", "--preset", "wild"], "--preset"),
    (["generate", "--regex", "a", "--json-schema", "s.json"], "not allowed with"),
    (["generate", "--json-schema", "no-such-schema.json"], "--json-schema"),
    (["generate", "--regex", "a", "--model-dir", "somewhere"], "bundled"),
    (["train"], "--config"),
    (["train", "--config", "configs/models/missing.yaml"], "no such file"),
    (["train", "--config", "configs/models/tiny.yaml", "--steps", "0"], "--steps"),
    (["train", "--config", "configs/models/tiny.yaml", "--export-bundled"], "bundled_export"),
    (["bench"], "name"),
    (["bench", "nope"], "nope"),
    (["frobnicate"], "frobnicate"),
]

_RUN_ALL = """
import contextlib, io, json, sys
from rtdlm.__main__ import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps({"results": results, "jax_imported": "jax" in sys.modules}))
"""


@pytest.fixture(autouse=True)
def restore_rtdlm_logger():
    """The CLI adds a stderr handler to the "rtdlm" logger; leave no trace in other tests."""
    logger = logging.getLogger("rtdlm")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


@pytest.fixture(scope="module")
def bad_input_results(repo_root):
    """All BAD_INPUTS run in one fresh interpreter, so it shows whether JAX was imported."""
    argvs = [argv for argv, _ in BAD_INPUTS]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_ALL, json.dumps(argvs)],
        cwd=repo_root, capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize(("index", "expected"), [(i, word) for i, (_, word) in enumerate(BAD_INPUTS)],
                         ids=[" ".join(argv) or "empty" for argv, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(bad_input_results, index, expected):
    result = bad_input_results["results"][index]
    assert result["code"] == 2
    assert result["out"] == ""  # nothing echoed (no prompt glued to an error)
    lines = result["err"].splitlines()
    assert len(lines) == 1, result["err"]
    assert expected in lines[0]
    command = BAD_INPUTS[index][0][0]
    if command in ("generate", "train", "bench"):  # the subcommand's own name and --help
        assert lines[0].startswith(f"python -m rtdlm {command}: error: ")
        assert f"python -m rtdlm {command} --help" in lines[0]


def test_bad_inputs_are_found_before_jax_is_imported(bad_input_results):
    assert not bad_input_results["jax_imported"]


def test_bad_train_config_keys_are_one_line(tmp_path, capsys):
    config = yaml.safe_load(Path("configs/models/tiny.yaml").read_text())
    config["export"] = "rtdlm/models/weights/tiny.msgpack"  # the old key
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit:
        main(["train", "--config", str(path)])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and "unknown config keys ['export']" in error


def test_help_texts(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert r"--prompt 'def fib(n):\n    ' --preset balanced" in text  # the example, intact
    assert "configs/models/tiny.yaml" in text

    with pytest.raises(SystemExit) as exit:
        main(["bench", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "sampler" in text and "--save-results" in text

    with pytest.raises(SystemExit) as exit:
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 200)" in text and "(default: target)" in text
    assert "rows generated together" in text

    with pytest.raises(SystemExit) as exit:
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--export-bundled" in text and "runs/NAME" in text


def _rows(out: str, prompt: str) -> list[str]:
    """Each row's continuation from a `generate --batch N` printout."""
    first, rest = out.split("\n[", 1)
    rows = [first.rstrip("\n")]
    for block in rest.split("\n--- row ")[1:]:
        rows.append(block.split("---\n", 1)[1].rstrip("\n"))
    return [row[len(prompt) :] for row in rows]


def test_generate_with_a_regex(capsys):
    import re

    pattern = r"[1-9][0-9]{0,3}( [+*-] [1-9][0-9]{0,3}){1,2}"
    argv = ["generate", "--prompt", "x = ", "--regex", pattern, "--batch", "3", "--max-new-tokens", "24"]
    assert main(argv) == 0
    rows = _rows(capsys.readouterr().out, "x = ")
    assert len(rows) == 3 and all(re.fullmatch(pattern, row) for row in rows), rows


@pytest.mark.slow
def test_generate_with_a_json_schema(tmp_path, capsys):
    schema = {"type": "object", "properties": {"kind": {"enum": ["class", "def"]}, "n": {"type": "integer"}},
              "required": ["kind", "n"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    argv = ["generate", "--prompt", "v = ", "--json-schema", str(path), "--batch", "2",
            "--max-new-tokens", "48"]
    assert main(argv) == 0
    rows = _rows(capsys.readouterr().out, "v = ")
    for row in rows:
        doc = json.loads(row)
        assert doc["kind"] in ("class", "def") and isinstance(doc["n"], int), row


def test_generate_with_stop_text_and_logprobs(capsys):
    argv = ["generate", "--prompt", "def add(a, b):\\n    return", "--preset", "deterministic",
            "--max-new-tokens", "60", "--stop", "\n", "--logprobs"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    generated = out.split("\n[", 1)[0].split("return", 1)[1]
    assert generated.endswith("\n") and "\n" not in generated.rstrip("\n")  # ends at the stop
    assert len(generated) < 58
    assert "token logprobs (row 0):" in out and "mean logprob per row: 0.0000" in out  # greedy: 0


def test_bad_regex_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--regex", "(ab", "--max-new-tokens", "4"])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and "regex" in error


@pytest.mark.parametrize(
    "extra",
    [
        ["--preset", "balanced"],
        ["--temperature", "0.7", "--top-k", "20", "--batch", "2"],
        pytest.param(["--speculative", "draft", "--num-speculative-tokens", "3"], marks=pytest.mark.slow),
        pytest.param(
            ["--speculative", "self", "--early-exit-layer", "2", "--preset", "deterministic"],
            marks=pytest.mark.slow,
        ),
    ],
)
def test_generate_prints_prompt_text_and_speed(capsys, extra):
    assert main(["generate", "--prompt", "def fib(n):", "--max-new-tokens", "12", *extra]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def fib(n):")
    # Both paths time a second run: prefill included, compile excluded.
    assert "tokens/s, prefill included, compile excluded" in out
    if "--speculative" in extra:
        assert "; drafts accepted " in out and "draft drafts" not in out


def test_prompt_lookup_text_equals_plain_greedy_text(capsys):
    """--speculative lookup is lossless: greedy text is plain decoding's, drafts accepted."""
    prompt = r"x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n"
    common = ["generate", "--prompt", prompt, "--max-new-tokens", "24", "--preset", "deterministic"]
    texts = []
    for extra in ([], ["--speculative", "lookup", "--ngram-size", "2"]):
        assert main([*common, *extra]) == 0
        out = capsys.readouterr().out
        texts.append(out.split("\n[")[0])
    assert texts[0] == texts[1]
    assert "; drafts accepted " in out and "(prompt lookup, n-grams up to 2)" in out


@pytest.mark.slow
def test_train_without_matplotlib_and_without_touching_bundled_weights(tmp_path, capsys, monkeypatch):
    """Training completes without matplotlib (the plot is skipped, and says so), and a config's
    bundled_export path is written only with --export-bundled."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    config = yaml.safe_load(Path("configs/models/tiny.yaml").read_text())
    config["bundled_export"] = str(tmp_path / "bundled.msgpack")
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    argv = ["train", "--config", str(config_path), "--steps", "2", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["output_dir"] == str(out)
    assert "loss.png skipped: matplotlib is not installed" in captured.err
    assert (out / "log.json").exists() and (out / "model.msgpack").exists()
    assert not (out / "loss.png").exists()
    assert not (tmp_path / "bundled.msgpack").exists()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random Llama checkpoint (transformers' save_pretrained) with a BPE tokenizer.json
    and a greedy generation_config.json."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n"] * 20,
                                  trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(directory)
    (directory / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "bos_token_id": 1, "eos_token_id": 2})
    )
    return directory


def _generated_text(out: str, prompt: str) -> str:
    first = out.rsplit("\n\n[", 1)[0]  # the text, its newline, then a blank line and [summary]
    assert first.startswith(prompt), out
    return first[len(prompt):]


def test_generate_from_a_hugging_face_checkpoint(hf_checkpoint, capsys):
    """--model-dir: the checkpoint's greedy generation_config (no preset given), its
    tokenizer and EOS: the text equals `generate`'s on the loaded model."""
    import jax

    from rtdlm.decoding import generate
    from rtdlm.models import from_pretrained, load_tokenizer
    from rtdlm.sampling import SamplingConfig

    prompt = "def fibonacci(n):"
    argv = ["generate", "--model-dir", str(hf_checkpoint), "--prompt", prompt, "--max-new-tokens", "10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tokens/s, prefill included, compile excluded" in out
    tokenizer = load_tokenizer(hf_checkpoint)
    expected = generate(from_pretrained(hf_checkpoint), tokenizer.encode(prompt)[None], key=jax.random.key(0),
                        config=SamplingConfig.from_generation_config(hf_checkpoint), max_new_tokens=10,
                        eos_token_id=tokenizer.eos_token_id)
    assert _generated_text(out, prompt) == tokenizer.decode(expected.tokens[0, : int(expected.lengths[0])])


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [["--draft-dir", "CHECKPOINT"], ["--speculative", "self", "--early-exit-layer", "1"]],
    ids=["draft-dir", "self-speculative"],
)
def test_speculative_generate_from_a_hugging_face_checkpoint(hf_checkpoint, capsys, extra):
    """Greedy (the checkpoint's generation_config): speculative text equals plain decoding's."""
    prompt = "def fibonacci(n):"
    base = ["generate", "--model-dir", str(hf_checkpoint), "--prompt", prompt, "--max-new-tokens", "10"]
    texts = []
    for flags in ([], [str(hf_checkpoint) if a == "CHECKPOINT" else a for a in extra]):
        assert main([*base, *flags]) == 0
        out = capsys.readouterr().out
        texts.append(_generated_text(out, prompt))
    assert "; drafts accepted " in out
    assert texts[0] == texts[1]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model-dir", "no/such/dir"], "--model-dir 'no/such/dir': no such directory"),
        (["--model-dir", "CHECKPOINT", "--draft-dir", "no/such/draft"], "--draft-dir 'no/such/draft'"),
        (["--model-dir", "CHECKPOINT", "--speculative", "draft"], "needs --draft-dir"),
        (["--model-dir", "CHECKPOINT", "--speculative", "self", "--early-exit-layer", "3"], "1..2"),
        (["--draft-dir", "CHECKPOINT"], "--draft-dir needs --model-dir"),
    ],
)
def test_bad_checkpoint_directories_are_one_line_and_exit_code_2(hf_checkpoint, capsys, extra, expected):
    argv = ["generate", *[str(hf_checkpoint) if a == "CHECKPOINT" else a for a in extra]]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert expected in captured.err and "python -m rtdlm generate --help" in captured.err


def test_generate_with_beam_search(capsys):
    """--num-beams K prints the best beam, then each row's K beams with scores, best first."""
    assert main(["generate", "--prompt", "def fib(n):", "--max-new-tokens", "8", "--num-beams", "3",
                 "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def fib(n):") and "[beam search, 3 beams, 2 rows:" in out
    scores = [float(line.rsplit(" ", 2)[1]) for line in out.splitlines() if line.startswith("--- row 0 beam")]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert "--- row 1 beam 2 score" in out
