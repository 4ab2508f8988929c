"""Smoke tests of the training loop on the tiny config (seconds on a CPU)."""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rtdlm.models import data as data_lib
from rtdlm.models import train as train_lib
from rtdlm.models.transformer import create_model, load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, "configs", "models", "tiny.yaml")


@pytest.fixture(scope="module")
def corpus():
    return data_lib.load_stdlib_corpus()


def test_corpus_split_is_deterministic_and_disjoint(corpus):
    files = data_lib.stdlib_source_files()
    assert len(files) > 50 and all(f.endswith(".py") for f in files)
    validation = [f for f in files if data_lib.is_validation_file(f)]
    assert 0 < len(validation) < len(files) // 5
    assert corpus.num_validation_files == len(validation)
    assert corpus.num_train_files == len(files) - len(validation)
    # Files are joined by EOS and contain no other NUL bytes.
    assert np.count_nonzero(corpus.train == data_lib.EOS_ID) == corpus.num_train_files
    a = data_lib.fixed_batches(corpus.validation, 2, 3, 16)
    b = data_lib.fixed_batches(corpus.validation, 2, 3, 16)
    for (xa, ya), (xb, _yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(xa[:, 1:], ya[:, :-1])  # targets are the next byte
        assert xa.shape == (3, 16) and xa.dtype == np.int32


def test_resolve_exit_layers():
    assert train_lib.resolve_exit_layers("all", 4) == (1, 2, 3)
    assert train_lib.resolve_exit_layers([3, 1], 4) == (1, 3)
    assert train_lib.resolve_exit_layers("none", 4) == ()
    with pytest.raises(ValueError, match="exit layer"):
        train_lib.resolve_exit_layers([4], 4)


def test_exit_losses_match_model_exits():
    model = create_model(TINY_YAML, nnx.Rngs(0))
    kernel = model.head.kernel
    kernel[...] = jax.random.normal(jax.random.key(0), kernel[...].shape)
    inputs = jax.random.randint(jax.random.key(1), (2, 8), 0, 256, dtype=jnp.int32)
    targets = jnp.roll(inputs, -1, axis=1)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))

    @jax.jit
    def losses_and_reference(model, inputs, targets):
        losses = train_lib.exit_losses(model, inputs, targets, (1, 2))
        reference = [
            optax.softmax_cross_entropy_with_integer_labels(
                model(inputs, positions, None, exit_layer=layer)[0], targets
            ).mean()
            for layer in (1, 2)
        ]
        return losses, jnp.stack(reference)

    losses, reference = losses_and_reference(model, inputs, targets)
    np.testing.assert_allclose(losses, reference, rtol=1e-5)


def test_model_configs_write_runs_not_bundled_weights_by_default():
    """The configs the README runs name a git-ignored run folder; their bundled_export (the
    committed weights) is written only with export_bundled."""
    with open(os.path.join(REPO, ".gitignore")) as f:
        assert "/runs/" in f.read().split()
    for name in ("tiny", "draft", "target"):
        config = train_lib.check_config(os.path.join(REPO, "configs", "models", f"{name}.yaml"))
        assert config["output_dir"] == f"runs/{name}"
        assert config.get("bundled_export") in (None, f"rtdlm/models/weights/{name}.msgpack")
    tracked = subprocess.run(["git", "ls-files", "runs"], cwd=REPO, capture_output=True, text=True)
    assert tracked.stdout == ""


def test_check_config_names_bad_keys():
    with pytest.raises(ValueError, match="unknown config keys"):
        train_lib.check_config({"model": {}, "export": "x.msgpack"})
    with pytest.raises(ValueError, match="unknown train config keys"):
        train_lib.check_config({"model": {}, "train": {"stepz": 3}})
    with pytest.raises(ValueError, match="'model:' section"):
        train_lib.check_config({"train": {}})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus):
    """One 20-step run of the tiny config (with float16 exports: to a path and, as with
    --export-bundled, to the config's bundled_export), shared by the tests."""
    out = tmp_path_factory.mktemp("tiny_run")
    config = {**train_lib.check_config(TINY_YAML), "bundled_export": str(out / "bundled16.msgpack")}
    result = train_lib.train(
        config, output_dir=str(out), steps=20, progress=False, corpus=corpus,
        export=str(out / "tiny16.msgpack"), export_bundled=True,
    )
    return out, result


def test_tiny_training_run(tiny_run):
    out, result = tiny_run
    history = result.log["history"]
    losses = [h["loss"] for h in history]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # starts near ln(256) * 1.5 and goes down
    final = result.log["final"]
    assert set(final["val_bpb_per_exit"]) == {1, 2}
    assert 0 < final["val_bpb"] < 8.5
    # The eval step sampled text with rtdlm.decoding.generate.
    assert all(e["sample"].startswith("def ") for e in result.log["evals"])

    # Outputs: log, plot, orbax checkpoint folder, final model, float16 exports.
    for name in ("log.json", "loss.png", "checkpoints", "model.msgpack", "tiny16.msgpack",
                 "bundled16.msgpack"):
        assert (out / name).exists(), name
    assert train_lib.latest_checkpoint_step(out / "checkpoints") == 20
    with open(out / "log.json") as f:
        assert json.load(f)["name"] == "tiny"


def test_checkpoint_and_exports_round_trip(tiny_run):
    out, result = tiny_run
    tokens = jnp.asarray(data_lib.encode("def main():\n"))[None]
    positions = jnp.arange(tokens.shape[1])[None]
    forward = jax.jit(lambda m: m(tokens, positions, None)[0])
    expected = forward(result.model)
    np.testing.assert_array_equal(forward(load_model(str(out / "model.msgpack"))), expected)
    _, params = nnx.split(result.model, nnx.Param)
    tx, _ = train_lib.make_optimizer(train_lib.TrainConfig.from_dict({"steps": 20}), params)
    model, opt_state, step = train_lib.load_checkpoint(str(out / "checkpoints"), tx.init(params))
    assert step == 20
    np.testing.assert_array_equal(forward(model), expected)
    assert jax.tree.structure(opt_state) == jax.tree.structure(tx.init(params))
    assert int(opt_state[1][0].count) == 20  # Adam's step count came back too
    model_only, no_opt_state, _ = train_lib.load_checkpoint(str(out / "checkpoints"))
    assert no_opt_state is None
    np.testing.assert_array_equal(forward(model_only), expected)
    for name in ("tiny16.msgpack", "bundled16.msgpack"):
        np.testing.assert_allclose(forward(load_model(str(out / name))), expected, atol=0.05)


def test_train_main_cli_resumes(tiny_run, capsys):
    """The CLI resumes the finished tiny run: no steps left, so it only re-evaluates."""
    out, result = tiny_run
    code = train_lib.train_main([
        "--config", TINY_YAML, "--output-dir", str(out), "--steps", "20", "--resume", "--no-progress",
    ])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["name"] == "tiny"
    assert summary["val_bpb"] == pytest.approx(result.log["final"]["val_bpb"], rel=1e-5)
    with open(out / "log.json") as f:
        log = json.load(f)
    assert log["history"][-1]["step"] == 20  # the earlier history was kept
