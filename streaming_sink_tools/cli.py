"""The ``streaming-sink`` command line: engine-free tools around the policy.

    streaming-sink diagnose MODEL [--text FILE | --corpus austen] [--samples N] [--length T] [--out DIR]

Subcommands live in ``_COMMANDS``; each one adds its own parser and imports its heavy
modules (torch, transformers) only when it runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "streaming-sink"


def _add_diagnose(sub) -> None:
    from streaming_sink_tools.diagnose import DEFAULTS

    p = sub.add_parser(
        "diagnose",
        help="measure a model's attention sinks (HF transformers, CPU) and recommend --sink-tokens",
        description="Run a Hugging Face causal LM over a few windows of text with eager attention and report "
                    "its attention sinks per layer and head: first-token share, sink rate (Gu et al. 2025), "
                    "dormant heads, learned sink logits; writes DIR/sinks.json and DIR/sinks.png. "
                    "See docs/diagnose.md.",
    )
    p.add_argument("model", metavar="MODEL", help="a Hugging Face model folder (config.json, weights, tokenizer) "
                                                  "or a .gguf file (dequantized on load)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="FILE", help="a UTF-8 text file to sample windows from")
    src.add_argument("--corpus", choices=["austen"], help="a prepared corpus (default: austen, "
                                                         "`streaming-sink-prepare corpus`)")
    p.add_argument("--samples", type=int, metavar="N", default=DEFAULTS["samples"], help="windows, evenly spaced over the text "
                                                                            "(default %(default)s)")
    p.add_argument("--length", type=int, metavar="T", default=DEFAULTS["length"], help="tokens per window, special tokens "
                                                                          "included (default %(default)s)")
    p.add_argument("--out", metavar="DIR", default="diagnose-out", help="where sinks.json and sinks.png go "
                                                                        "(default %(default)s)")
    p.add_argument("--eps", type=float, default=DEFAULTS["eps"], help="a head has a sink when its first-token "
                                                                      "share exceeds this (default %(default)s)")
    p.add_argument("--tau", type=float, default=DEFAULTS["tau"], help="dormant: a sink head whose output norm is "
                                                                      "below tau x the layer's mean (default "
                                                                      "%(default)s)")
    p.add_argument("--mass", type=float, default=DEFAULTS["mass"], help="recommend the fewest sink tokens holding "
                                                                        "this share of the sink mass of the first "
                                                                        "16 positions (default %(default)s)")
    p.add_argument("--min-sink-rate", type=float, metavar="PERCENT", default=DEFAULTS["min_rate"],
                   help="below this sink rate (percent) no sink tokens are needed (default %(default)s)")
    p.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                   help="start each window with BOS: auto = as the tokenizer (and so the engine) does")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_diagnose)


def _run_diagnose(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from streaming_sink_tools import diagnose as D

    res = D.diagnose(
        args.model, text_file=args.text, corpus=None if args.text else (args.corpus or "austen"),
        samples=args.samples, length=args.length, eps=args.eps, tau=args.tau, mass=args.mass,
        min_rate=args.min_sink_rate, bos=args.bos, dtype=args.dtype, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sinks.json").write_text(json.dumps(res, indent=1) + "\n")
    D.plot(res, out / "sinks.png")
    print(D.format_table(res))
    print(f"\nwrote {out / 'sinks.json'} and {out / 'sinks.png'} ({res['seconds']:.0f} s)")
    return 0


_COMMANDS = [_add_diagnose]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="StreamingLLM attention sinks: tools that need no engine.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    from streaming_sink_tools.diagnose import DiagnoseError

    try:
        return args.run(args)
    except DiagnoseError as err:
        print(f"{PROG} {args.cmd}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
