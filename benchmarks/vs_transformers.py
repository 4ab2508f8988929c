"""rtdlm vs Hugging Face transformers (PyTorch, CPU) on the same weights, in one process.

The bundled target and draft byte models are converted to `LlamaForCausalLM` (the inverse
of `rtdlm.models.pretrained`'s name mapping); their logits must agree with rtdlm's within
1e-4 (float32) before anything is timed, and the largest difference is recorded. Then,
interleaved (round robin, order rotated each round, medians and their ratios):

- `generate` tokens/s at B=1 and B=16, greedy and sampling (temperature 0.7, top-k 50,
  top-p 0.9): rtdlm `generate` vs transformers `generate` with its default dynamic cache
  and with `cache_implementation="static"`;
- speculative decoding (greedy, K draft tokens): rtdlm `speculative_generate` vs
  transformers assisted generation (`assistant_model=`, `num_assistant_tokens=K`, batch 1,
  the only batch it supports); rtdlm also at B=16;
- prompt lookup (greedy, K drafts from n-grams of up to 3 tokens) on copy-heavy prompts:
  rtdlm `prompt_lookup_generate` vs transformers `prompt_lookup_num_tokens=K`
  (`max_matching_ngram_size=3`, batch 1), each beside its own `generate`; rtdlm also at
  B=16.

Every row generates exactly `max_new_tokens` tokens (no EOS), prefill included; rtdlm's
compilation and one warm-up call of each program are excluded. Torch runs with its default
thread count. On a shared machine trust the ratios, not the absolute times.

    python benchmarks/vs_transformers.py --quick          # smoke run
    python benchmarks/vs_transformers.py --save-results   # benchmarks/results/
"""

from __future__ import annotations

import argparse
import statistics
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
    load_average,
    output_path,
    ratio,
    time_interleaved,
    write_json,
)
from benchmarks.speculative import COPY_PROMPTS, prompt_batch  # noqa: E402
from rtdlm.decoding import generate, prompt_lookup_generate, speculative_generate  # noqa: E402
from rtdlm.models import encode, load_model  # noqa: E402
from rtdlm.sampling import SamplingConfig  # noqa: E402

PROMPT = "import os\n\n\ndef main(argv):\n    "
GREEDY = SamplingConfig(temperature=0.0, do_sample=False)
SAMPLING = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, do_sample=True)
HF_SAMPLING = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
HF_GREEDY = dict(do_sample=False)


def to_transformers(model, windowed: bool = False):
    """An rtdlm `Transformer` -> an equal `transformers.LlamaForCausalLM` (float32, eval mode),
    equal up to `attention_window` positions; `windowed`: a `MistralForCausalLM` with the
    same sliding window, equal at any length (the same weights).

    The inverse of `rtdlm.models.pretrained._params`: the fused q|k|v and gate|up kernels
    are split, and [in, out] kernels transposed to torch's [out, in].
    """
    import torch
    from flax import nnx
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    c = model.config
    if c.mlp_type != "swiglu" or c.qkv_bias:
        raise ValueError(f"only SwiGLU models without q/k/v biases convert to Llama, got {c}")
    head_dim = c.head_dim or c.d_model // c.num_heads
    kv_heads = c.num_kv_heads or c.num_heads
    shared = dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.mlp_dim,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
        tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    if windowed:
        hf_config = MistralConfig(sliding_window=c.attention_window, max_position_embeddings=4096, **shared)
    else:  # rtdlm's sliding window of attention_window positions is full attention up to there
        hf_config = LlamaConfig(max_position_embeddings=c.attention_window or c.max_length or 4096, **shared)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    t = lambda x: torch.tensor(np.asarray(x, np.float32))
    q_out, kv_out = c.num_heads * head_dim, kv_heads * head_dim
    state = {"model.embed_tokens.weight": t(params["embedding"]["embedding"]),
             "model.norm.weight": t(params["final_norm"]["scale"])}
    if not c.tie_embeddings:
        state["lm_head.weight"] = t(params["head"]["kernel"]).T
    for i in range(c.num_layers):
        block, p = params["blocks"][i], f"model.layers.{i}."
        qkv = t(block["attn"]["qkv"]["kernel"])
        up = t(block["mlp"]["up"]["kernel"])
        state.update({
            p + "input_layernorm.weight": t(block["attn_norm"]["scale"]),
            p + "post_attention_layernorm.weight": t(block["mlp_norm"]["scale"]),
            p + "self_attn.q_proj.weight": qkv[:, :q_out].T,
            p + "self_attn.k_proj.weight": qkv[:, q_out: q_out + kv_out].T,
            p + "self_attn.v_proj.weight": qkv[:, q_out + kv_out:].T,
            p + "self_attn.o_proj.weight": t(block["attn"]["out"]["kernel"]).T,
            p + "mlp.gate_proj.weight": up[:, : c.mlp_dim].T,
            p + "mlp.up_proj.weight": up[:, c.mlp_dim:].T,
            p + "mlp.down_proj.weight": t(block["mlp"]["down"]["kernel"]).T,
        })
    hf = (MistralForCausalLM if windowed else LlamaForCausalLM)(hf_config).eval()
    missing, unexpected = hf.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    return hf


def max_logit_difference(model, hf, lengths=(1, 17, 100)) -> float:
    """The largest |rtdlm - transformers| logit over random prompts of several lengths."""
    import torch

    worst = 0.0
    for length in lengths:
        tokens = np.random.default_rng(length).integers(0, model.vocab_size, (2, length)).astype(np.int32)
        positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        ours = np.asarray(model(jnp.asarray(tokens), positions, model.init_cache(2, length))[0])
        with torch.no_grad():
            theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


def hf_generate(hf, prompt, max_new_tokens, **kwargs):
    import torch

    ids = torch.tensor(np.asarray(prompt), dtype=torch.long)

    def run():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0, **kwargs)
        assert out.shape[1] == ids.shape[1] + max_new_tokens
        return None  # nothing for jax.block_until_ready to wait on

    return run


def rtdlm_generate(model, prompt, max_new_tokens, config, seed=0):
    key = jax.random.key(seed)
    return lambda: generate(model, prompt, key=key, config=config, max_new_tokens=max_new_tokens).tokens


def tokens_per_second(rounds, tokens):
    return tokens / statistics.median([t for calls in rounds for t in calls])


def compare(programs, tokens, repeats, baseline="rtdlm"):
    seconds = time_interleaved(programs, repeats=repeats)
    row = {name: {"tokens_per_s": tokens_per_second(values, tokens)} for name, values in seconds.items()}
    for name in programs:
        if name != baseline:
            # > 1: rtdlm is faster (the ratio of the other's median time to rtdlm's).
            row[f"{baseline}_over_{name}"] = ratio(seconds[name], seconds[baseline])
    return row


def bench_generate(model, hf, batches, max_new_tokens, repeats):
    rows = []
    prompt1 = encode(PROMPT)[None]
    for batch in batches:
        prompt = np.tile(prompt1, (batch, 1))
        for mode, config, hf_kwargs in (("greedy", GREEDY, HF_GREEDY), ("sampling", SAMPLING, HF_SAMPLING)):
            programs = {
                "rtdlm": rtdlm_generate(model, prompt, max_new_tokens, config),
                "transformers_dynamic": hf_generate(hf, prompt, max_new_tokens, **hf_kwargs),
                "transformers_static": hf_generate(hf, prompt, max_new_tokens, cache_implementation="static",
                                                   **hf_kwargs),
            }
            row = compare(programs, batch * max_new_tokens, repeats)
            row.update(batch=batch, mode=mode, new_tokens=max_new_tokens, prompt_tokens=prompt.shape[1])
            rows.append(row)
            print(f"generate B={batch} {mode}: rtdlm {row['rtdlm']['tokens_per_s']:.0f} tok/s, x"
                  f"{row['rtdlm_over_transformers_dynamic']['ratio']:.2f} transformers (dynamic cache), x"
                  f"{row['rtdlm_over_transformers_static']['ratio']:.2f} (static cache)", flush=True)
    return rows


def bench_speculative(target, draft, hf_target, hf_draft, k, max_new_tokens, repeats, batches):
    rows = []
    prompt1 = encode(PROMPT)[None]
    key = jax.random.key(0)
    for batch in batches:
        prompt = np.tile(prompt1, (batch, 1))
        programs = {
            "rtdlm_speculative": lambda prompt=prompt: speculative_generate(
                target, draft, prompt, key=key, config=GREEDY, max_new_tokens=max_new_tokens,
                num_speculative_tokens=k).tokens,
            "rtdlm_generate": rtdlm_generate(target, prompt, max_new_tokens, GREEDY),
        }
        if batch == 1:  # assisted generation supports batch 1 only
            programs["transformers_assisted"] = hf_generate(
                hf_target, prompt, max_new_tokens, assistant_model=hf_draft, num_assistant_tokens=k,
                num_assistant_tokens_schedule="constant", **HF_GREEDY)
            programs["transformers_dynamic"] = hf_generate(hf_target, prompt, max_new_tokens, **HF_GREEDY)
        row = compare(programs, batch * max_new_tokens, repeats, baseline="rtdlm_speculative")
        row.update(batch=batch, K=k, mode="greedy", new_tokens=max_new_tokens)
        rows.append(row)
        line = f"speculative B={batch} K={k}: rtdlm {row['rtdlm_speculative']['tokens_per_s']:.0f} tok/s"
        line += f", x{row['rtdlm_speculative_over_rtdlm_generate']['ratio']:.2f} rtdlm generate"
        if batch == 1:
            assisted = row["rtdlm_speculative_over_transformers_assisted"]["ratio"]
            line += f", x{assisted:.2f} transformers assisted"
        print(line, flush=True)
    return rows


def bench_prompt_lookup(target, hf_target, k, max_new_tokens, repeats, batches, prompts):
    """Per copy-heavy prompt at B=1 (transformers' prompt lookup runs batch 1 only), then all
    the copy-heavy prompts as one batch per larger B (rtdlm only)."""
    rows = []
    common = dict(key=jax.random.key(0), config=GREEDY, max_new_tokens=max_new_tokens)
    cases = [(1, encode(text)[None], None, i) for i, text in enumerate(prompts)]
    cases += [(b, *prompt_batch(b, COPY_PROMPTS), None) for b in batches if b > 1]
    for batch, prompt, lengths, index in cases:
        programs = {
            "rtdlm_lookup": lambda prompt=prompt, lengths=lengths: prompt_lookup_generate(
                target, prompt, prompt_lengths=lengths, num_speculative_tokens=k, ngram_size=3, **common
            ).tokens,
            "rtdlm_generate": lambda prompt=prompt, lengths=lengths: generate(
                target, prompt, prompt_lengths=lengths, **common
            ).tokens,
        }
        if batch == 1:
            programs["transformers_lookup"] = hf_generate(
                hf_target, prompt, max_new_tokens, prompt_lookup_num_tokens=k, max_matching_ngram_size=3,
                **HF_GREEDY)
            programs["transformers_dynamic"] = hf_generate(hf_target, prompt, max_new_tokens, **HF_GREEDY)
        row = compare(programs, batch * max_new_tokens, repeats, baseline="rtdlm_lookup")
        row.update(batch=batch, K=k, mode="greedy", new_tokens=max_new_tokens,
                   prompt_tokens=int(prompt.shape[1]), copy_prompt=index)
        line = f"prompt lookup B={batch} K={k}: rtdlm {row['rtdlm_lookup']['tokens_per_s']:.0f} tok/s"
        line += f", x{row['rtdlm_lookup_over_rtdlm_generate']['ratio']:.2f} rtdlm generate"
        if batch == 1:  # and each library's prompt lookup over its own generate
            theirs = row["transformers_lookup"]["tokens_per_s"] / row["transformers_dynamic"]["tokens_per_s"]
            row["transformers_lookup_over_transformers_dynamic"] = {"ratio": theirs}
            line += f", x{row['rtdlm_lookup_over_transformers_lookup']['ratio']:.2f} transformers prompt"
            line += f" lookup (which is x{theirs:.2f} its generate)"
        rows.append(row)
        print(line, flush=True)
    return rows


def plot(payload, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{path.name} skipped: matplotlib is not installed")
        return
    labels, values = [], []
    for row in payload["generate"]:
        for other in ("dynamic", "static"):
            labels.append(f"B={row['batch']} {row['mode']}\nvs {other}")
            values.append(row[f"rtdlm_over_transformers_{other}"]["ratio"])
    for row in payload["speculative"]:
        if "rtdlm_speculative_over_transformers_assisted" in row:
            labels.append(f"spec B=1 K={row['K']}\nvs assisted")
            values.append(row["rtdlm_speculative_over_transformers_assisted"]["ratio"])
    for row in payload.get("prompt_lookup", []):
        if "rtdlm_lookup_over_transformers_lookup" in row:
            labels.append(f"lookup B=1 #{row['copy_prompt']}\nvs theirs")
            values.append(row["rtdlm_lookup_over_transformers_lookup"]["ratio"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(values)), 4))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("rtdlm tokens/s / transformers tokens/s")
    ax.set_title(f"rtdlm vs transformers, same weights ({payload['environment']['device_slug']})")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}x", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few tokens and repeats, for a smoke test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per step (default: %(default)s)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    import torch

    start = time.perf_counter()
    target, draft = load_model("target"), load_model("draft")
    hf_target, hf_draft = to_transformers(target), to_transformers(draft)
    differences = {"target": max_logit_difference(target, hf_target),
                   "draft": max_logit_difference(draft, hf_draft)}
    # The copy-heavy prompts run past the window: compared with the windowed (Mistral) twin.
    hf_windowed = to_transformers(target, windowed=True)
    differences["target_windowed"] = max_logit_difference(target, hf_windowed, lengths=(17, 300, 420))
    print(f"max |logit difference| rtdlm vs transformers: {differences}", flush=True)
    # Past the window, float32 round-off grows with the positions (1.9e-4 at 300, 2.5e-4 at 420).
    if max(differences["target"], differences["draft"]) > 1e-4 or differences["target_windowed"] > 1e-3:
        raise SystemExit(f"the converted models disagree: {differences}")
    new_tokens, repeats = (8, 1) if args.quick else (args.max_new_tokens, args.repeats)
    batches = (1, 2) if args.quick else (1, 16)
    payload = {
        "environment": environment(),
        "quick": args.quick,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers_version": __import__("transformers").__version__,
        "models": {"target": str(target.config), "draft": str(draft.config)},
        "max_abs_logit_difference": differences,
        "load_average_before": load_average(),
        "generate": bench_generate(target, hf_target, batches, new_tokens, repeats),
        "speculative": bench_speculative(target, draft, hf_target, hf_draft, args.k, new_tokens, repeats,
                                         batches),
        "prompt_lookup": bench_prompt_lookup(target, hf_windowed, args.k, new_tokens, repeats, batches,
                                             prompts=COPY_PROMPTS[: 1 if args.quick else 2]),
        "load_average_after": load_average(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    env = payload["environment"]
    out = output_path(args, f"vs-transformers-{env['device_slug']}{'-quick' if args.quick else ''}.json")
    write_json(out, payload)
    plot(payload, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
