"""TP=1, TP=2 and PP=2 on vLLM's own distributed runtime, with --kv-policy streaming-sink and
stock (no policy), on one machine (``distributed_executor_backend="mp"``, one worker process
per rank). Table + JSON: decode tok/s (wall) and decode tokens per process CPU-second, summed
over every process of the engine (the engine's own process, which holds the engine core
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and its worker processes: psutil over the children).

Each engine lives in its own child process (this script with ``--child``) and stays up for the
whole run of its config; per config the stock and the policy engine take turns (stock, policy,
stock, policy, ...: ``--repeats`` each, medians), one generating at a time. A run: ``--batch``
requests of ``--prompt`` random tokens (seeded per repeat, the same for stock and policy; prefix
caching off), ``--new`` greedy tokens each (``ignore_eos``). Decode is timed inside the child from
the step after every request has its first token to the end (prefill excluded); CPU seconds are
the user+system time of the engine's processes over the same span (psutil), so "cores" = CPU s /
wall s says how many of the machine's cores the engine kept busy.

Model: the tiny random Llama of tests/tiny_models.py with a 4096-token context (stock may then
run as long as the policy) unless ``--model`` is given (e.g. SmolLM2 from ``streaming-sink-prepare``;
its 9 query / 3 KV heads do not split over TP=2: use ``--configs tp1,pp2``). Policy: S=4, W=128,
block 32 (dense up to token 160), so with the default 200-token prompts the policy decodes in
the streaming regime and stock decodes dense: the same work per step, up to the attention
span. "same tokens as TP=1": repeat 0's greedy tokens of that system equal its TP=1 run's.

Threads (``--threads``, comma-separated; one table section each):
  one      OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind (the default: one compute thread per process)
  default  VLLM_CPU_OMP_THREADS_BIND=nobind, OMP_NUM_THREADS unset: every process starts as many
           OpenMP threads as there are cores (what you get with only ``nobind``)
  passive  as default, plus OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning)
  bind     VLLM_CPU_OMP_THREADS_BIND=0|1 (rank r pinned to core r: vLLM then sets 1 thread a rank);
           TP=1: 0-1
vLLM's own default (``auto``) binds each rank to one NUMA node and refuses world size 2 on a
one-node machine. PP=2 runs with ``compilation_config={"mode": 1, "backend": "eager"}`` (Dynamo,
no Inductor) for stock and policy: vLLM CPU 0.32 cannot run PP with ``enforce_eager`` (the later
stage's intermediate-tensor buffer is never allocated; stock fails too); TP=1/TP=2 run eager.

    .venv/bin/python benchmarks/bench_distributed.py                       # TP=1/TP=2/PP=2, --threads one
    .venv/bin/python benchmarks/bench_distributed.py --threads one,default --new 32 --repeats 2
    .venv/bin/python benchmarks/bench_distributed.py --json /tmp/dist.json --configs tp1,tp2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
S, W, BS = 4, 128, 32
CONFIGS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
BASE_ENV = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
                DO_NOT_TRACK="1", VLLM_HOST_IP="127.0.0.1", VLLM_ENABLE_V1_MULTIPROCESSING="0")


def thread_env(mode: str, world: int) -> dict[str, str | None]:
    """Env for the engine's processes; None = unset."""
    if mode == "one":
        return {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    if mode == "default":
        return {"OMP_NUM_THREADS": None, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    if mode == "passive":
        return {"OMP_NUM_THREADS": None, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_WAIT_POLICY": "PASSIVE"}
    if mode == "bind":
        return {"OMP_NUM_THREADS": None, "VLLM_CPU_OMP_THREADS_BIND": "0|1" if world == 2 else "0-1"}
    raise SystemExit(f"--threads: unknown mode {mode!r} (one, default, passive, bind)")


# ---- the child: one engine, commands on stdin, replies on a pipe -------------------

def _cpu_seconds() -> float:
    """user+system CPU seconds of this process and every descendant (the engine's workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def child(args) -> None:
    import psutil

    if args.policy:
        import vllm_sink  # noqa: F401
    from vllm import LLM, SamplingParams

    reply = os.fdopen(args.reply_fd, "w", buffering=1)
    tp, pp = CONFIGS[args.config]
    kw = dict(model=args.model, block_size=BS, dtype=args.dtype, seed=0, max_num_batched_tokens=2048,
              max_num_seqs=max(16, args.batch), enable_prefix_caching=False, max_model_len=args.max_model_len,
              tensor_parallel_size=tp, pipeline_parallel_size=pp)
    if tp * pp > 1:
        kw["distributed_executor_backend"] = "mp"
    if pp > 1:
        kw["compilation_config"] = {"mode": 1, "backend": "eager"}
    else:
        kw["enforce_eager"] = True
    if args.policy:
        kw.update(kv_policy="streaming-sink", sink_tokens=S, sink_window=W)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    engine = llm.llm_engine
    reply.write(json.dumps({"ready_s": time.perf_counter() - t0,
                            "processes": 1 + len(psutil.Process().children(recursive=True))}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        params = SamplingParams(max_tokens=cmd["new"], temperature=0, ignore_eos=True)
        rids = [f"{cmd['tag']}-{i}" for i in range(len(cmd["prompts"]))]
        for rid, p in zip(rids, cmd["prompts"]):
            engine.add_request(rid, {"prompt_token_ids": p}, params)
        produced, final, mark = {}, {}, None
        while engine.has_unfinished_requests():
            for out in engine.step():
                produced[out.request_id] = len(out.outputs[0].token_ids)
                final[out.request_id] = out
            if mark is None and len(produced) == len(rids) and min(produced.values()) >= 1:
                mark = (time.perf_counter(), _cpu_seconds(), sum(produced.values()))
        end = (time.perf_counter(), _cpu_seconds(), sum(produced.values()))
        reply.write(json.dumps({
            "decode_tokens": end[2] - mark[2], "wall_s": end[0] - mark[0], "cpu_s": end[1] - mark[1],
            "tokens": [list(final[r].outputs[0].token_ids) for r in rids]}) + "\n")
    reply.close()


# ---- the parent --------------------------------------------------------------------

class Engine:
    def __init__(self, args, config: str, policy: bool, threads: str, log_dir: Path):
        tp, pp = CONFIGS[config]
        env = dict(os.environ)
        for k, v in {**BASE_ENV, **thread_env(threads, tp * pp)}.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if not policy:  # stock: vLLM loads no general plugin at all (VLLM_PLUGINS names none)
            env["VLLM_PLUGINS"] = ""
        else:
            env.pop("VLLM_PLUGINS", None)
        r, w = os.pipe()
        self.name = f"{config}/{'policy' if policy else 'stock'}/{threads}"
        self.log = log_dir / (self.name.replace("/", "-") + ".log")
        cmd = [sys.executable, __file__, "--child", "--config", config, "--reply-fd", str(w), "--model", args.model,
               "--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--batch", str(args.batch)]
        if policy:
            cmd.append("--policy")
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         pass_fds=(w,), text=True, start_new_session=True)
        os.close(w)
        self.reply = os.fdopen(r)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.reply.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"{self.name}: engine exited {self.proc.returncode}; log {self.log}:\n"
                             + self.log.read_text()[-4000:])
        return json.loads(line)

    def run(self, tag: str, prompts: list[list[int]], new: int) -> dict:
        self.proc.stdin.write(json.dumps({"tag": tag, "prompts": prompts, "new": new}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"quit": true}\n')
            self.proc.stdin.close()
            self.proc.wait(120)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


def tiny_model(path: Path) -> str:
    if not (path / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_llama

        build_tiny_llama(path, max_position_embeddings=4096)
    return str(path)


def prompts_for(repeat: int, batch: int, n: int, vocab: int) -> list[list[int]]:
    g = random.Random(1000 + repeat)
    return [[g.randrange(3, vocab) for _ in range(n)] for _ in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: tiny random Llama, 4096 context)")
    ap.add_argument("--configs", default="tp1,tp2,pp2")
    ap.add_argument("--threads", default="one", help="comma-separated: one, default, passive, bind")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=384, help="prompt ids are drawn from [3, vocab)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--policy-first", action="store_true",
                    help="start and run the policy engine first in each pair (default: stock first)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--reply-fd", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    args.model = args.model or tiny_model(Path(tempfile.gettempdir()) / "streaming-sink-tiny4k-bench")
    load = os.getloadavg()
    print(f"model {args.model}, {args.dtype}, batch {args.batch} x ({args.prompt} prompt + {args.new} new), "
          f"S={S} W={W} block {BS}, repeats {args.repeats}, {os.cpu_count()} cores, load {load[0]:.1f}; logs {work}",
          flush=True)
    rows, tokens = [], {}
    order = (True, False) if args.policy_first else (False, True)
    for threads in args.threads.split(","):
        for config in args.configs.split(","):
            engines = {}
            try:
                for policy in order:  # one at a time: each waits idle while the other starts
                    e = Engine(args, config, policy, threads, work)
                    engines[policy] = e
                    print(f"  {e.name}: up in {e.info['ready_s']:.0f} s, {e.info['processes']} processes", flush=True)
                runs = {False: [], True: []}
                for rep in range(args.repeats):
                    prompts = prompts_for(rep, args.batch, args.prompt, args.vocab)
                    for policy in order:  # interleaved: stock, policy, stock, policy, ...
                        res = engines[policy].run(f"r{rep}", prompts, args.new)
                        runs[policy].append(res)
                        if rep == 0:
                            tokens[(threads, config, policy)] = res["tokens"]
                        print(f"    {engines[policy].name} repeat {rep}: {res['decode_tokens'] / res['wall_s']:.1f} tok/s, "
                              f"{res['decode_tokens'] / res['cpu_s']:.1f} tok/CPU-s", flush=True)
            finally:
                for e in engines.values():
                    e.close()
            for policy in (False, True):
                rs = runs[policy]
                rows.append(dict(
                    threads=threads, config=config, system="policy" if policy else "stock",
                    processes=engines[policy].info["processes"], ready_s=engines[policy].info["ready_s"],
                    tok_s=statistics.median(r["decode_tokens"] / r["wall_s"] for r in rs),
                    tok_cpu_s=statistics.median(r["decode_tokens"] / r["cpu_s"] for r in rs),
                    cores=statistics.median(r["cpu_s"] / r["wall_s"] for r in rs),
                    decode_tokens=rs[0]["decode_tokens"],
                    runs=[{k: r[k] for k in ("decode_tokens", "wall_s", "cpu_s")} for r in rs]))
    by = {(r["threads"], r["config"], r["system"]): r for r in rows}
    for r in rows:
        stock = by[(r["threads"], r["config"], "stock")]
        tp1 = by.get((r["threads"], "tp1", r["system"]))
        r["policy_over_stock_tok_s"] = r["tok_s"] / stock["tok_s"]
        r["policy_over_stock_tok_cpu_s"] = r["tok_cpu_s"] / stock["tok_cpu_s"]
        r["over_tp1_tok_s"] = r["tok_s"] / tp1["tok_s"] if tp1 else None
        r["over_tp1_tok_cpu_s"] = r["tok_cpu_s"] / tp1["tok_cpu_s"] if tp1 else None
        t1 = tokens.get((r["threads"], "tp1", r["system"] == "policy"))
        r["same_tokens_as_tp1"] = None if t1 is None else tokens[(r["threads"], r["config"], r["system"] == "policy")] == t1

    print()
    print("| threads | config | system | procs | decode tok/s | tok/CPU-s | cores busy | policy/stock tok/s | "
          "policy/stock tok/CPU-s | vs TP=1 tok/s | vs TP=1 tok/CPU-s | same tokens as TP=1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    for r in rows:
        print(f"| {r['threads']} | {r['config']} | {r['system']} | {r['processes']} | {f(r['tok_s'], 1)} | "
              f"{f(r['tok_cpu_s'], 1)} | {f(r['cores'])} | {f(r['policy_over_stock_tok_s'])} | "
              f"{f(r['policy_over_stock_tok_cpu_s'])} | {f(r['over_tp1_tok_s'])} | {f(r['over_tp1_tok_cpu_s'])} | "
              f"{'-' if r['same_tokens_as_tp1'] is None else ('yes' if r['same_tokens_as_tp1'] else 'NO')} |")
    out = dict(policy_first=args.policy_first, model=args.model, dtype=args.dtype, batch=args.batch, prompt=args.prompt, new=args.new,
               repeats=args.repeats, S=S, W=W, block_size=BS, cores=os.cpu_count(), load_at_start=load,
               load_at_end=os.getloadavg(), command=" ".join(sys.argv), rows=rows)
    print()
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
