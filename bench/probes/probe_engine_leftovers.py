"""Diagnostic (GPU): what each engine load leaves allocated in the process after it is closed.

Loads and closes a 2-layer tiny Llama 40 times on cuda:0 (one generation each) and prints the MiB
still allocated after each. With a new CUDA side stream per graph capture, every load left 64 MiB
(two cuBLAS workspaces) until PyTorch's pool of 32 streams wrapped; with the runner's one warm-up
stream per device only the first load leaves anything; with ``--prime`` the streams' workspaces
are made first (``graphs.prime_streams``, what profiling does before its first memory baseline)
and the first load should leave nothing either. Usage: ``python bench/probes/probe_engine_leftovers.py [--prime]``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _importable import ensure_importable  # noqa: E402

ensure_importable()
import torch  # noqa: E402

import iserve.gpu_agent.engine  # noqa: E402,F401
from iserve.gpu_agent.engine import Engine  # noqa: E402
from iserve.gpu_agent.engine.graphs import prime_streams  # noqa: E402
from iserve.modelmaker import make_checkpoint  # noqa: E402

model = make_checkpoint("/tmp/probe-leftovers", "tiny-llama", num_layers=2)
if "--prime" in sys.argv[1:]:
    prime_streams("cuda:0")
prev = torch.cuda.memory_allocated()
left = []
for _ in range(40):
    engine = Engine.load(model, [("cuda:0", 0, 2)], context_tokens=64)
    engine.generate(list(range(3, 20)), max_tokens=3, ignore_eos=True)
    engine.close()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    now = torch.cuda.memory_allocated()
    left.append((now - prev) >> 20)
    prev = now
print(f"primed {'--prime' in sys.argv[1:]}: MiB left allocated after each engine:", left)
