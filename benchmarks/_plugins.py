"""Put a deviceless compiler's plugin on the path before jax starts (``gpu_compile.py``,
``tpu_compile.py``; see ``kernels_pallas/aot.py``). Imports nothing but ``os`` and ``sys``."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Per platform: the default plugin directory and the environment its compile needs.
PLATFORMS = {
    "gpu": (".gpu_aot", {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",   # no cuDNN on a CPU host
                         "DEEPSEEK_JAX_KERNELS": "pallas_gpu"}),   # what impl="auto" picks on a GPU
    "tpu": (".tpu_aot", {"DEEPSEEK_JAX_KERNELS": "pallas_tpu",     # what impl="auto" picks on a TPU
                         "TPU_ACCELERATOR_TYPE": "v5p-8",          # quiets libtpu's host probing
                         "TPU_WORKER_HOSTNAMES": "localhost",
                         # no TPU is opened: two compiling processes (pytest -n 2, a script next
                         # to the tests) must not refuse each other libtpu's lock file
                         "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}),
}


def plugins_first(platform: str, argv: list[str]) -> None:
    """``--plugins DIR`` from ``argv`` (default: the platform's directory at the repository root)
    goes first on ``sys.path``; the platform's environment is set where not already."""
    default, env = PLATFORMS[platform]
    d = os.path.join(ROOT, default)
    for i, a in enumerate(argv):
        if a == "--plugins" and i + 1 < len(argv):
            d = argv[i + 1]
        elif a.startswith("--plugins="):
            d = a.split("=", 1)[1]
    if os.path.isdir(d):
        sys.path.insert(0, os.path.abspath(d))
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
