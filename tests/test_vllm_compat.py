"""vLLM features composed with --kv-policy streaming-sink (docs/compatibility.md).

One policy engine with LoRA enabled serves every feature here (LoRA, beam search, n>1,
structured outputs, stop strings, logprobs), and one stock engine the same features below
the window. Tiny random Llama (context 256), S=4, W=64, block 32: dense while a query's
block ``j <= Sb + Wb = 3`` (tokens < 128), so

- **below the window** (prompt 30 + up to 60 new) the policy's outputs must be ``==``
  stock's: dense rows run vLLM's own kernel on the same float32 math;
- **past the window** (prompt 200 + 60-100 new, ending past the 256-token context, with the
  window's old blocks back in the pool while the request runs) stock cannot serve the
  request at all, so the outputs are checked against the float64 oracle (tests/oracle.py;
  LoRA: the oracle of the base model with the adapter merged into its weights) or, where the
  feature's output is a structure (grammar, stop string), against that structure and the
  policy's own plain greedy stream.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from oracle import check_greedy
from vllm_helpers import make_llm, output_logprobs, random_ids

from vllm import SamplingParams  # noqa: E402  (vllm_helpers sets the in-process env first)
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.sampling_params import BeamSearchParams, StructuredOutputsParams  # noqa: E402

S, W, BS = 4, 64, 32
DENSE = 128  # first streaming token: (Sb + Wb + 1) * BS
BELOW, PAST = 30, 200  # prompt lengths
TOL = 2e-4  # float32 engine vs float64 oracle, logprobs (as tests/test_vllm_distributed.py)
LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ("q_proj", "v_proj")
# Both engines. JSON without free whitespace (a server-level setting in vLLM 0.32; the random
# model would otherwise fill max_tokens with whitespace, which the grammar allows).
ENGINE = dict(enforce_eager=True, enable_lora=True, max_lora_rank=LORA_RANK, max_loras=2,
              structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})


# ---- a tiny LoRA adapter, written as PEFT would, and the base model with it merged ----

def _write_lora(base: str, out: Path) -> tuple[str, str]:
    """Returns (adapter folder, merged model folder). B is non-zero (PEFT initialises it to
    zero, which would make the adapter a no-op) and large enough to change greedy tokens."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((Path(base) / "config.json").read_text())
    g = torch.Generator().manual_seed(7)
    weights = load_file(str(Path(base) / "model.safetensors"))
    adapter = {}
    for layer in range(cfg["num_hidden_layers"]):
        for target in LORA_TARGETS:
            name = f"model.layers.{layer}.self_attn.{target}"
            w = weights[f"{name}.weight"]
            a = torch.randn(LORA_RANK, w.shape[1], generator=g) * 0.1
            b = torch.randn(w.shape[0], LORA_RANK, generator=g) * 0.3
            adapter[f"base_model.model.{name}.lora_A.weight"] = a
            adapter[f"base_model.model.{name}.lora_B.weight"] = b
            weights[f"{name}.weight"] = w + (LORA_ALPHA / LORA_RANK) * (b @ a)
    lora = out / "lora"
    lora.mkdir()
    save_file(adapter, str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": LORA_ALPHA,
        "target_modules": list(LORA_TARGETS), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": base}))
    merged = out / "merged"
    shutil.copytree(base, merged)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(merged / "model.safetensors"))
    return str(lora), str(merged)


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory):
    return _write_lora(tiny_llama, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def policy(tiny_llama):
    engine = make_llm(tiny_llama, sink_tokens=S, sink_window=W, max_model_len=2048, **ENGINE)
    yield engine
    del engine


@pytest.fixture(scope="module")
def stock(tiny_llama, policy):
    engine = make_llm(tiny_llama, policy=False, **ENGINE)
    yield engine
    del engine


@pytest.fixture(scope="module")
def oracle(tiny_llama):
    from oracle import OracleLlama

    return OracleLlama(tiny_llama, sink_tokens=S, window_tokens=W, block_size=BS)


def text_ids(llm, n: int, seed: int) -> list[int]:
    """``n`` prompt tokens of ASCII words. For tests that read the output *text*: vLLM's
    incremental detokenizer (stock too) can put a random prompt's trailing partial UTF-8
    bytes into the first output text; whole-ASCII prompts have none."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    text = "".join(letters[i] for i in torch.randint(len(letters), (8 * n,), generator=g).tolist())
    ids = llm.get_tokenizer().encode(text)
    assert len(ids) >= n
    return ids[:n]


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0, **kw)


def _gen(llm, prompts, params, lora_request=None):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=lora_request,
                        use_tqdm=False)


def _same(a, b, what):
    """Two RequestOutputs' completions: same tokens, same logprobs (``==``)."""
    assert len(a.outputs) == len(b.outputs), what
    for i, (x, y) in enumerate(zip(a.outputs, b.outputs)):
        assert list(x.token_ids) == list(y.token_ids), f"{what}, output {i}: tokens differ from stock"
        if x.logprobs is not None:
            assert [d[t].logprob for d, t in zip(x.logprobs, x.token_ids)] == \
                   [d[t].logprob for d, t in zip(y.logprobs, y.token_ids)], f"{what}, output {i}: logprobs"


def _live_blocks_back(llm):
    from vllm_helpers import free_blocks, kv_manager

    pool = kv_manager(llm).block_pool
    assert free_blocks(llm) == pool.num_gpu_blocks - 1, "KV blocks not all back in the pool"


# ---- LoRA ------------------------------------------------------------------------

def test_lora(policy, stock, lora, oracle):
    """One batch mixing the base model and the adapter, past the window, against the oracle
    of each (the adapter's: its weights merged); below the window ``==`` stock with LoRA."""
    from oracle import OracleLlama

    path, merged = lora
    req = LoRARequest("tiny-lora", 1, path)
    past, n = random_ids(PAST, seed=1), 100
    outs = _gen(policy, [past, past], _greedy(n), lora_request=[None, req])
    base_gen, base_lp = output_logprobs(outs[0])
    lora_gen, lora_lp = output_logprobs(outs[1])
    assert base_gen != lora_gen, "the adapter changed nothing: the test would not see it"
    check_greedy(oracle.logprobs(past + base_gen), PAST, base_gen, base_lp, TOL, "base, past the window")
    merged_oracle = OracleLlama(merged, sink_tokens=S, window_tokens=W, block_size=BS)
    check_greedy(merged_oracle.logprobs(past + lora_gen), PAST, lora_gen, lora_lp, TOL, "LoRA, past the window")

    below = random_ids(BELOW, seed=2)
    a = _gen(policy, [below], _greedy(60), lora_request=req)[0]
    b = _gen(stock, [below], _greedy(60), lora_request=req)[0]
    _same(a, b, "LoRA below the window")
    _live_blocks_back(policy)


# ---- beam search ------------------------------------------------------------------

def test_beam_search(policy, stock, oracle):
    """vLLM's offline beam search: one 1-token request per beam per step, each resuming the
    beam's history from the prefix cache (under the policy: the sinks and the window). Past the
    window each beam's cumulative logprob is the oracle's over its tokens; below ``==`` stock."""
    width = 3
    past = random_ids(PAST, seed=3)
    params = BeamSearchParams(beam_width=width, max_tokens=70, ignore_eos=True)
    beams = policy.beam_search([{"prompt_token_ids": past}], params)[0].sequences
    assert len(beams) == width and len({tuple(b.tokens) for b in beams}) == width
    assert [b.cum_logprob for b in beams] == sorted((b.cum_logprob for b in beams), reverse=True)
    for i, beam in enumerate(beams):
        assert beam.tokens[:PAST] == past and len(beam.tokens) == PAST + 70
        gen = beam.tokens[PAST:]
        lp = oracle.logprobs(beam.tokens)[PAST - 1:-1].gather(1, torch.tensor(gen)[:, None]).sum().item()
        assert abs(lp - beam.cum_logprob) < TOL * 70, f"beam {i}: cum logprob {beam.cum_logprob} vs oracle {lp}"

    below = random_ids(BELOW, seed=4)
    params = BeamSearchParams(beam_width=width, max_tokens=40, ignore_eos=True)
    a = policy.beam_search([{"prompt_token_ids": below}], params)[0].sequences
    b = stock.beam_search([{"prompt_token_ids": below}], params)[0].sequences
    assert [(x.tokens, x.cum_logprob) for x in a] == [(y.tokens, y.cum_logprob) for y in b]
    _live_blocks_back(policy)


# ---- n > 1 (parallel sampling) --------------------------------------------------------

def test_n_samples(policy, stock, oracle):
    """n=3 seeded samples of one prompt: below the window ``==`` stock; past it, every
    sample's tokens carry the oracle's logprobs (vLLM's logprobs are the model's, before
    temperature) and the samples differ."""
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=80, ignore_eos=True, logprobs=0)
    past = random_ids(PAST, seed=5)
    out = _gen(policy, [past], params)[0]
    assert len(out.outputs) == 3 and len({tuple(o.token_ids) for o in out.outputs}) == 3
    for i, o in enumerate(out.outputs):
        gen = list(o.token_ids)
        lps = torch.tensor([d[t].logprob for d, t in zip(o.logprobs, gen)], dtype=torch.float64)
        want = oracle.logprobs(past + gen)[PAST - 1:-1].gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        assert (lps - want).abs().max().item() < TOL, f"sample {i}"

    below = random_ids(BELOW, seed=6)
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=60, ignore_eos=True, logprobs=0)
    _same(_gen(policy, [below], params)[0], _gen(stock, [below], params)[0], "n=3 below the window")


# ---- structured outputs (xgrammar) --------------------------------------------------

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                          "code": {"type": "string", "pattern": "^[a-z]{3}$"}},
          "required": ["color", "ok", "code"], "additionalProperties": False}
REGEX = r"[a-z]{4}-[0-9]{3}-(yes|no)"
CHOICE = ["streaming", "sink", "window"]
GRAMMARS = {
    "json_schema": (StructuredOutputsParams(json=SCHEMA),
                    lambda text: json.loads(text).keys() == SCHEMA["properties"].keys()),
    "regex": (StructuredOutputsParams(regex=REGEX), lambda text: re.fullmatch(REGEX, text)),
    "choice": (StructuredOutputsParams(choice=CHOICE), lambda text: text in CHOICE),
}


@pytest.mark.parametrize("kind", list(GRAMMARS))
def test_structured_outputs(policy, stock, kind):
    """The output follows the grammar past the window (prompt 200: the first grammar token is
    decoded in the streaming regime); below the window ``==`` stock. Greedy, so the grammar's
    token mask is what picks each token."""
    so, valid = GRAMMARS[kind]
    params = SamplingParams(max_tokens=60, temperature=0, structured_outputs=so, logprobs=0)
    # several requests at once, one past the window and one below it, in one batch
    prompts = [text_ids(policy, PAST + 50, seed=7), text_ids(policy, BELOW, seed=8)]
    outs = _gen(policy, prompts, params)
    for o, what in zip(outs, ("past", "below")):
        text = o.outputs[0].text
        assert o.outputs[0].finish_reason == "stop", f"{kind} {what}: grammar not completed: {text!r}"
        assert valid(text), f"{kind} {what}: {text!r}"
    _same(outs[1], _gen(stock, prompts[1:], params)[0], f"{kind} below the window")


# ---- stop strings -------------------------------------------------------------------

def test_stop_strings(policy, stock):
    """A stop string that first appears past the window ends the stream exactly there (the
    text is the plain greedy text's prefix before it); below the window ``==`` stock."""
    past = text_ids(policy, PAST, seed=9)
    full = _gen(policy, [past], _greedy(100))[0].outputs[0]
    # a printable 3-character stop string from the second half of the text (decoded past the
    # context); the stream must end at its first occurrence
    text = full.text
    cut = next(i for i in range(len(text) // 2, len(text) - 3) if text[i:i + 3].isascii() and text[i:i + 3].isprintable())
    stop = text[cut:cut + 3]
    stopped = _gen(policy, [past], _greedy(100, stop=[stop]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == full.text[:full.text.find(stop)]

    below = text_ids(policy, BELOW, seed=10)
    text = _gen(stock, [below], _greedy(60))[0].outputs[0].text
    stop = text[20:22]
    params = _greedy(60, stop=[stop])
    _same(_gen(policy, [below], params)[0], _gen(stock, [below], params)[0], "stop below the window")


# ---- logprobs -----------------------------------------------------------------------

def test_logprobs(policy, stock, oracle):
    """Top-5 logprobs of every decoded token and the prompt's logprobs past the window equal
    the oracle's (values and, where no near-tie, ranks); below the window ``==`` stock."""
    k = 5
    past = random_ids(PAST, seed=12)
    params = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True, logprobs=k, prompt_logprobs=k)
    out = _gen(policy, [past], params)[0]
    gen = list(out.outputs[0].token_ids)
    ref = oracle.logprobs(past + gen)  # [t] = log p(. | tokens[:t+1])
    for step, d in enumerate(out.outputs[0].logprobs):
        want = ref[PAST - 1 + step]
        top = want.topk(k + 1)
        assert len(d) >= k
        ranked = sorted(d.items(), key=lambda kv: kv[1].rank)
        for tok, lp in ranked[:k]:
            assert abs(lp.logprob - want[tok].item()) < TOL, (step, tok)
        clear = (top.values[k - 1] - top.values[k]).item() > 1e-3
        if clear:
            assert {t for t, _ in ranked[:k]} == set(top.indices[:k].tolist()), step
    plp = out.prompt_logprobs
    got = torch.tensor([plp[i][past[i]].logprob for i in range(1, PAST)], dtype=torch.float64)
    want = ref[:PAST - 1].gather(1, torch.tensor(past[1:])[:, None]).squeeze(1)
    assert (got - want).abs().max().item() < TOL

    below = random_ids(BELOW, seed=13)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, logprobs=k)
    a, b = _gen(policy, [below], params)[0], _gen(stock, [below], params)[0]
    _same(a, b, "logprobs below the window")
    assert [{t: v.logprob for t, v in d.items()} for d in a.outputs[0].logprobs] == \
           [{t: v.logprob for t, v in d.items()} for d in b.outputs[0].logprobs]


# ---- async scheduling ---------------------------------------------------------------

def test_async_scheduling_as_stock(tiny_llama):
    """vLLM CPU turns async scheduling off for every engine (CpuPlatform.check_and_update_config:
    "not required on CPU"): with the policy an explicit --async-scheduling ends where stock's
    does, and the policy engine's config is otherwise built (no refusal). On CUDA the KV
    manager frees by processed tokens, which async scheduling leaves correct."""
    from vllm.engine.arg_utils import EngineArgs

    def config(**kw):
        return EngineArgs(model=tiny_llama, block_size=BS, dtype="float32", async_scheduling=True, **kw) \
            .create_engine_config()

    pol = config(kv_policy="streaming-sink", sink_tokens=S, sink_window=W, max_model_len=2048)
    base = config()
    assert pol.additional_config["streaming_sink"]["kv_policy"] == "streaming-sink"
    assert pol.scheduler_config.async_scheduling == base.scheduler_config.async_scheduling


# ---- the table itself ---------------------------------------------------------------

def test_compatibility_table_names_real_tests():
    """Every test docs/compatibility.md cites (``path::name``, or ``::name`` for the file cited
    last on that row) is a test function of that file: a renamed test breaks the table here."""
    root = Path(__file__).resolve().parents[1]
    rows = [line for line in (root / "docs" / "compatibility.md").read_text().splitlines() if line.startswith("| ")]
    cited = 0
    for row in rows:
        current = None
        for ref in re.findall(r"`((?:tests/[\w/]+\.py)?(?:::\w+)?)`", row):
            path, _, name = ref.partition("::")
            current = path or current
            assert current, f"{ref} cites no file: {row}"
            source = (root / current).read_text()
            if name:
                assert re.search(rf"^def {name}\(", source, re.M), f"docs/compatibility.md: {current}::{name} is no test"
            cited += 1
    assert cited >= 20
