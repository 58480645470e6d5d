"""Run a fixed workload through sglang.Engine and print it as JSON (see test_sglang_stock.py).

``python stock_run.py MODEL [MODEL ...] [engine keyword=json-value ...]``: one JSON object,
model folder -> its workload's outputs (one process for all: SGLang's import is paid once). Run with
``SGLANG_PLUGINS=__none__`` it is stock SGLang: no plugin of ours is loaded at all.
"""

from __future__ import annotations

import json
import sys


def workload(engine) -> dict:
    from sglang_helpers import random_ids

    prompts = [random_ids(n, seed=30 + n) for n in (5, 40, 60)]
    outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 60, "temperature": 0,
                                                               "ignore_eos": True}, return_logprob=True)
    ids = random_ids(120, seed=31)  # SGLang admits prompts up to context - 6 tokens
    plp = engine.generate(input_ids=[ids], sampling_params={"max_new_tokens": 1, "temperature": 0},
                          return_logprob=True, logprob_start_len=0)
    return {"greedy": [[list(x[:2]) for x in o["meta_info"]["output_token_logprobs"]] for o in outs],
            "prompt_logprobs": [x[0] for x in plp[0]["meta_info"]["input_token_logprobs"]]}


def main() -> None:
    import sglang
    from sglang_helpers import engine_args

    models = [a for a in sys.argv[1:] if "=" not in a]
    extra = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[1:] if "=" in a)}
    results = {}
    for model in models:
        engine = sglang.Engine(**engine_args(model, policy=False, **extra))
        try:
            results[model] = workload(engine)
        finally:
            engine.shutdown()
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
