"""HF reference for bench_flag_tax.py: PyPI `attention-sinks` 0.4.0 (StreamingLLM on transformers).

Runs in its own venv (``.venv-hf``: torch 2.13.0+cpu, transformers 4.34.0, tokenizers 0.14.1,
attention-sinks 0.4.0, einops); bench_flag_tax.py --hf-attention-sinks makes the venv and
starts this worker. Protocol: one JSON line on stdout when the model is loaded, then per JSON
line on stdin (``{"prompts": [[token ids], ...], "new": N}``, equal-length prompts, no padding)
one JSON line back with the same fields bench_flag_tax.py's vLLM runs report: prefill and decode
wall / process-CPU seconds and token counts. The prompt goes in chunks of ``--chunk`` tokens
(attention-sinks trims the cache to sinks + window after every forward); the first new token comes
from the prefill's logits, the other N-1 from greedy decode steps, which alone are timed as decode.
Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="HF folder whose config.json has rope_theta")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--window", type=int, required=True, help="attention_sink_window_size")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens per forward)")
    args = ap.parse_args()

    import transformers
    from attention_sinks import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=getattr(torch, args.dtype),
        attention_sink_size=args.sink_tokens, attention_sink_window_size=args.window)
    model.eval()
    print(json.dumps(dict(torch=torch.__version__, transformers=transformers.__version__,
                          attention_sinks="0.4.0", torch_threads=torch.get_num_threads(),
                          rope_theta=getattr(model.config, "rope_theta", None), sink_tokens=args.sink_tokens,
                          window=args.window, chunk=args.chunk)), flush=True)

    for line in sys.stdin:
        req = json.loads(line)
        ids = torch.tensor(req["prompts"], dtype=torch.long)
        batch, n = ids.shape
        new = req["new"]
        out_ids = []
        with torch.inference_mode():
            pkv = None
            w0, c0 = time.perf_counter(), time.process_time()
            for s in range(0, n, args.chunk):
                out = model(input_ids=ids[:, s:s + args.chunk], past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            out_ids.append(tok)
            prefill = (time.perf_counter() - w0, time.process_time() - c0)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(new - 1):
                out = model(input_ids=tok, past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                out_ids.append(tok)
            decode = (time.perf_counter() - w0, time.process_time() - c0)
        print(json.dumps(dict(prefill_wall=prefill[0], prefill_cpu=prefill[1], prefill_tokens=batch * n,
                              decode_wall=decode[0], decode_cpu=decode[1], decode_tokens=batch * (new - 1),
                              cache_tokens=int(pkv[0][0].shape[2]),
                              outputs=torch.cat(out_ids, 1).tolist())), flush=True)


if __name__ == "__main__":
    main()
