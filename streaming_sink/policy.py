"""The streaming-sink contract as named, engine-free rules.

Notation (docs/architecture.md): ``bs`` KV block size, ``S`` sink tokens,
``Sb = ceil(S / bs)`` sink blocks, ``Wb`` window blocks, ``W = Wb * bs``.
A query at absolute position ``t`` lives in block ``j = t // bs``.

* dense regime ``j <= Sb + Wb``: keys ``[0, t]`` at their natural positions.
* streaming regime ``j > Sb + Wb``: keys ``[0, S) + [ws(j), t]`` where
  ``ws(j) = (j - Wb) * bs``; RoPE positions are positions *in the cache*.

One definition covers both regimes: let ``ws(j) = S`` for a dense block.
Then the cache position of any token is ``pos(t) = S + t - ws(j(t))``
(``= t`` when dense), and a key of window block ``jk`` written at ``pos(k)``
must be seen ``delta = ws(j) - ws(jk)`` positions lower by a query of block
``j`` — which the attention applies as a rotation of the query by
``+delta`` (sinks: ``delta = 0``). Every rule here is a function of block
indices only, so it works elementwise on ints and on torch tensors alike.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from .errors import PolicyConfigError

@dataclass(frozen=True)
class SinkPolicy:
    """Sink tokens + a block-granular sliding window over a paged KV cache."""

    sink_tokens: int
    window_tokens: int
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise PolicyConfigError(f"KV block size must be positive, got {self.block_size}")
        if self.sink_tokens < 0:
            raise PolicyConfigError(
                f"--sink-tokens must be >= 0 (0 is plain window attention), got {self.sink_tokens}")
        if self.window_tokens <= 0 or self.window_tokens % self.block_size:
            raise PolicyConfigError(
                f"--sink-window must be a positive multiple of the KV block size "
                f"({self.block_size}), got {self.window_tokens}; "
                f"e.g. {max(1, round(self.window_tokens / self.block_size)) * self.block_size}")

    # ---- sizes -------------------------------------------------------
    @property
    def sink_blocks(self) -> int:
        return math.ceil(self.sink_tokens / self.block_size)

    @property
    def window_blocks(self) -> int:
        return self.window_tokens // self.block_size

    @property
    def dense_blocks(self) -> int:
        """Blocks ``0 .. Sb + Wb`` are the dense regime (``Sb + Wb + 1`` blocks)."""
        return self.sink_blocks + self.window_blocks + 1

    @property
    def dense_tokens(self) -> int:
        """Queries at ``t < dense_tokens`` compute exactly what the stock engine does."""
        return self.dense_blocks * self.block_size

    @property
    def max_position(self) -> int:
        """Largest RoPE position ever used; must be < the model's rotary table."""
        return self.dense_tokens - 1

    def max_live_blocks(self, tokens_in_flight: int = 1) -> int:
        """Bound on blocks a running request holds: sinks + window + the
        current block, plus the blocks a prefill chunk of that many tokens spans."""
        extra = math.ceil(max(tokens_in_flight - 1, 0) / self.block_size)
        return self.sink_blocks + self.window_blocks + 1 + extra

    # ---- block rules (ints or integer tensors) ------------------------
    def is_streaming(self, j):
        return j > self.sink_blocks + self.window_blocks

    def window_start(self, j):
        """``ws(j)``: first window token of a query in block ``j`` (``S`` when dense)."""
        streaming_ws = (j - self.window_blocks) * self.block_size
        if isinstance(j, int):
            return streaming_ws if self.is_streaming(j) else self.sink_tokens
        return _where(self.is_streaming(j), streaming_ws, self.sink_tokens)

    def cache_position(self, t, sink_tokens=None):
        """``pos(t)``: the RoPE position a token is written (and queried) at.
        ``sink_tokens``: each token's own ``S`` (a tensor like ``t``: a batch whose
        requests have their own sink lengths); None: the policy's."""
        if sink_tokens is None:
            return self.sink_tokens + t - self.window_start(t // self.block_size)
        if isinstance(sink_tokens, int):
            return self.with_sinks(sink_tokens).cache_position(t)
        # The same rule with S elementwise: Sb = ceil(S / bs), dense => ws = S.
        j = t // self.block_size
        streaming = j > self.sink_blocks_of(sink_tokens) + self.window_blocks
        ws = _where(streaming, (j - self.window_blocks) * self.block_size, sink_tokens)
        return sink_tokens + t - ws

    # ---- per-request sink lengths (issue 23: every request may carry its own S) ----
    def with_sinks(self, sink_tokens: int) -> "SinkPolicy":
        """The same window and block size with another ``S``: one request's policy."""
        return self if sink_tokens == self.sink_tokens else replace(self, sink_tokens=int(sink_tokens))

    def sink_blocks_of(self, sink_tokens):
        """``Sb = ceil(S / bs)`` for an int or an integer tensor of sink lengths."""
        return -(-sink_tokens // self.block_size)

    def dense_tokens_of(self, sink_tokens):
        """``dense_tokens`` for an int or an integer tensor of sink lengths (per sequence)."""
        return (self.sink_blocks_of(sink_tokens) + self.window_blocks + 1) * self.block_size

    def first_window_block(self, j):
        """First live block after the sink blocks for a query in block ``j``."""
        if isinstance(j, int):
            return j - self.window_blocks if self.is_streaming(j) else self.sink_blocks
        return _where(self.is_streaming(j), j - self.window_blocks, self.sink_blocks)

    def query_delta(self, j, jk):
        """Extra rotation (in positions) of a block-``j`` query against keys of
        window block ``jk``: the block was written ``delta`` positions higher
        than where the query must see it now. Not for sink keys (delta 0)."""
        return self.window_start(j) - self.window_start(jk)

    def live_blocks(self, j: int) -> list[int]:
        """Logical blocks a block-``j`` query reads (and the manager keeps)."""
        if not self.is_streaming(j):
            return list(range(j + 1))
        return list(range(self.sink_blocks)) + list(range(j - self.window_blocks, j + 1))

    def attended_keys(self, t: int) -> list[int]:
        """Absolute key positions the query at ``t`` attends (contract, token level)."""
        j = t // self.block_size
        if not self.is_streaming(j):
            return list(range(t + 1))
        return list(range(self.sink_tokens)) + list(range(self.window_start(j), t + 1))

    def freeable_prefix_blocks(self, num_computed_tokens: int) -> range:
        """Blocks a request no longer needs once ``num_computed_tokens`` are in the
        cache: no later query (block >= the next token's block) reads them."""
        j_next = num_computed_tokens // self.block_size
        return range(self.sink_blocks, max(self.sink_blocks, self.first_window_block(j_next)))

    # ---- prefix reuse (docs/architecture.md, "Prefix reuse") ----------
    def hit_blocks(self, h: int) -> list[int]:
        """Cached blocks a new request must find to resume at block ``h``: what its
        first query (block ``h``) reads before ``h``. The gap is never needed."""
        return self.live_blocks(h)[:-1]

    def longest_hit(self, num_blocks: int, cached) -> int:
        """Largest ``h <= num_blocks`` whose ``hit_blocks(h)`` are all ``cached(b)``
        (0 if none): how many blocks a new request can resume from. Scans from the
        right for ``Wb`` contiguous cached blocks (as vLLM's sliding-window lookup
        does) once the sinks are found cached, else takes the dense prefix."""
        seen: dict[int, bool] = {}
        cached = functools.partial(_probe_once, seen, cached)
        dense_last = self.sink_blocks + self.window_blocks  # the last dense query block
        prefix = 0  # cached blocks from block 0, as far as a dense hit can use them
        while prefix < min(num_blocks, dense_last) and cached(prefix):
            prefix += 1
        if prefix >= self.sink_blocks:
            run = 0
            # i: first block of a window [i, i + Wb); h = i + Wb must be streaming.
            for i in range(num_blocks - 1, dense_last - self.window_blocks, -1):
                run = run + 1 if cached(i) else 0
                if run == self.window_blocks:
                    return i + self.window_blocks
        return prefix

    # ---- model checks -------------------------------------------------
    def check_layer_window(self, sliding_window: int | None, what: str = "a layer") -> None:
        """A layer with its own sliding window (GPT-OSS, Gemma, Mistral) keeps it under
        the policy: keys with ``t - k < sliding_window``, at true relative distances.
        Those must lie inside the policy's window blocks, whose positions the policy
        defines: ``t - ws(j) >= W`` for every query, so ``sliding_window <= W + 1``.
        A larger layer window is not defined by the contract: refused."""
        if sliding_window is not None and sliding_window - 1 > self.window_tokens:
            need = -(-(sliding_window - 1) // self.block_size) * self.block_size
            raise PolicyConfigError(
                f"{what} has its own sliding window of {sliding_window} tokens, longer than "
                f"--sink-window {self.window_tokens} + 1: the policy only keeps (and positions) "
                f"the last --sink-window tokens. Use --sink-window >= {need}.")

    def check_rotary_table(self, rotary_table_len: int, what: str = "the model") -> None:
        if self.max_position >= rotary_table_len:
            raise PolicyConfigError(
                f"--sink-tokens {self.sink_tokens} + --sink-window {self.window_tokens} with "
                f"block size {self.block_size} use RoPE positions up to {self.max_position}, "
                f"beyond the rotary table of {what} ({rotary_table_len} positions). "
                f"Use --sink-window <= {self.largest_window(rotary_table_len, self.sink_tokens, self.block_size)}.")

    @staticmethod
    def largest_window(rotary_table_len: int, sink_tokens: int, block_size: int) -> int:
        """The largest window whose positions fit a rotary table (the default window)."""
        sb = math.ceil(sink_tokens / block_size)
        return max(0, (rotary_table_len // block_size - sb - 1) * block_size)

    @classmethod
    def resolve(cls, sink_tokens: int, window_tokens: int | None, block_size: int,
                rotary_table_len: int, what: str = "the model",
                max_sink_tokens: int | None = None) -> "SinkPolicy":
        """The policy an engine runs: ``window_tokens=None`` picks the largest
        window the rotary table allows; every bad value raises PolicyConfigError.
        ``max_sink_tokens``: the largest ``S`` a request may ask for
        (``--max-sink-tokens``); the window is resolved so that every request's
        positions fit the table, ``S`` up to ``max(sink_tokens, max_sink_tokens)``."""
        if sink_tokens < 0:
            raise PolicyConfigError(
                f"--sink-tokens must be >= 0 (0 is plain window attention), got {sink_tokens}")
        widest = max(sink_tokens, max_sink_tokens or 0)
        flags = "--sink-tokens" if widest == sink_tokens else "--max-sink-tokens"
        if window_tokens is None:
            window_tokens = cls.largest_window(rotary_table_len, widest, block_size)
            if window_tokens <= 0:
                raise PolicyConfigError(
                    f"{what} has a rotary table of {rotary_table_len} positions: too small for "
                    f"{widest} sink tokens and even one {block_size}-token window block "
                    f"({flags} / --block-size)")
        policy = cls(sink_tokens, window_tokens, block_size)
        if widest > sink_tokens:
            widest_policy = policy.with_sinks(widest)
            if widest_policy.max_position >= rotary_table_len:
                raise PolicyConfigError(
                    f"--max-sink-tokens {widest} + --sink-window {window_tokens} with block size "
                    f"{block_size} use RoPE positions up to {widest_policy.max_position}, beyond the "
                    f"rotary table of {what} ({rotary_table_len} positions). Use --sink-window <= "
                    f"{cls.largest_window(rotary_table_len, widest, block_size)} or a smaller "
                    f"--max-sink-tokens.")
        policy.check_rotary_table(rotary_table_len, what)
        return policy

    def describe(self) -> str:
        return (f"streaming-sink: {self.sink_tokens} sink tokens ({self.sink_blocks} block(s)) + "
                f"{self.window_tokens}-token window ({self.window_blocks} blocks of {self.block_size}); "
                f"RoPE positions <= {self.max_position}")


def _probe_once(seen: dict, cached, b: int) -> bool:
    if b not in seen:
        seen[b] = bool(cached(b))
    return seen[b]


def _where(cond, a, b):
    import torch

    return torch.where(cond, a, torch.as_tensor(b, device=cond.device, dtype=a.dtype)
                       if not isinstance(b, torch.Tensor) else b)

