"""The command line on the bundled weights: `python -m rtdlm generate ...`."""

import pytest

from rtdlm.__main__ import main


@pytest.mark.parametrize(
    "extra",
    [
        ["--preset", "balanced"],
        ["--temperature", "0.7", "--top-k", "20", "--batch", "2"],
        ["--speculative", "draft", "--num-speculative-tokens", "3"],
        ["--speculative", "self", "--early-exit-layer", "2", "--preset", "deterministic"],
    ],
)
def test_generate_prints_prompt_text_and_speed(capsys, extra):
    assert main(["generate", "--prompt", "def fib(n):", "--max-new-tokens", "12", *extra]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def fib(n):")
    assert "tokens/s" in out


def test_generate_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--max-new-tokens", "0"])
    assert "max_new_tokens" in capsys.readouterr().err


def test_train_subcommand_passes_options_to_the_trainer(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--config", "configs/models/tiny.yaml", "--steps", "2", "--output-dir", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    assert (out / "log.json").exists()
