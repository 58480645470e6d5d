"""Diagnostics: ``SGLANG_SINK_TRACE=/path/steps.jsonl`` makes the scheduler append one
JSON line per step, before its allocation (touch point 4): the KV slots each request of
the step holds of its own (``step``: rid -> slots), the live slots the radix tree holds
(``tree``: shared, locked or evictable) and the slots in use in SGLang's allocator
(``used``). The SGLang tests read it (``used == sum(step) + tree``). Frees inside SGLang's
free groups land at the group's end, so an idle engine's next step shows what came back.
No SGLang import.
"""

from __future__ import annotations

import json
import os

TRACE_ENV = "SGLANG_SINK_TRACE"


def record_step(allocator, tree, held: dict[str, int]) -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    record = {"step": held, "used": allocator.size - allocator.available_size(),
              "tree": (tree.evictable_size() + tree.protected_size()) if tree is not None else 0}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
