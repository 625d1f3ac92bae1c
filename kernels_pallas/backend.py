"""Which implementation a kernel call uses.

Every public kernel function takes ``impl=`` with one of:

* ``"auto"`` (default): ``$DEEPSEEK_JAX_KERNELS`` if set, else by ``jax.default_backend()``:
  ``"pallas_gpu"`` on GPU, ``"pallas_tpu"`` on TPU, ``"ref"`` elsewhere (CPU).
* ``"ref"``: the plain-jnp reference (runs everywhere, differentiable, XLA-compiled).
* ``"pallas"``: the Pallas kernel for the current backend (on CPU: the interpreter).
* ``"pallas_gpu"`` / ``"pallas_tpu"``: that backend's kernel, compiled.
* ``"interpret"``: the Pallas kernel run by the Pallas interpreter (``interpret=True``), on any
  backend; it runs the TPU-style kernel (the generic ``BlockSpec`` + scalar-prefetch formulation).
* ``"interpret_gpu"`` / ``"interpret_tpu"``: that backend's kernel, interpreted.

The environment variable ``DEEPSEEK_JAX_KERNELS`` accepts ``ref``, ``pallas`` or ``interpret`` (or any
of the explicit names above) and only changes what ``"auto"`` means.
"""

from __future__ import annotations

import os

import jax

ENV_VAR = "DEEPSEEK_JAX_KERNELS"

#: Every value ``impl=`` accepts.
IMPLS = ("auto", "ref", "pallas", "pallas_gpu", "pallas_tpu", "interpret", "interpret_gpu", "interpret_tpu")


def _backend_kernel() -> str:
    backend = jax.default_backend()
    if backend == "gpu" or backend == "cuda" or backend == "rocm":
        return "pallas_gpu"
    if backend == "tpu":
        return "pallas_tpu"
    return "interpret"


def default_impl() -> str:
    """What ``impl="auto"`` resolves to right now (environment variable, then backend)."""
    env = env_impl()
    if env is not None:
        return resolve_impl(env)
    backend = _backend_kernel()
    return "ref" if backend == "interpret" else backend


def env_impl() -> str | None:
    """``$DEEPSEEK_JAX_KERNELS`` normalised (``None`` when unset, empty or ``auto``). Raises a
    one-line ``ValueError`` naming the variable for a value that is not a kernel impl name."""
    raw = os.environ.get(ENV_VAR, "")
    env = raw.strip().lower()
    if not env or env == "auto":
        return None
    if env not in IMPLS:
        raise ValueError(f"${ENV_VAR}={raw!r}: unknown kernel impl; expected one of {', '.join(IMPLS)}")
    return env


def check_impl(impl) -> str:
    """``impl`` normalised (lower case) if it is one of :data:`IMPLS`, else a one-line
    ``ValueError`` naming it. Resolves nothing (safe before any backend is initialised)."""
    if impl is None:
        return "auto"
    if not isinstance(impl, str) or impl.strip().lower() not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r}; expected one of {', '.join(IMPLS)}")
    return impl.strip().lower()


def resolve_impl(impl: str | None = "auto") -> str:
    """Normalise ``impl`` to one of ``ref``, ``pallas_gpu``, ``pallas_tpu``, ``interpret_gpu``,
    ``interpret_tpu``.  Raises ``ValueError`` for an unknown name."""
    impl = check_impl(impl)
    if impl == "auto":
        return default_impl()
    if impl == "pallas":
        backend = _backend_kernel()
        return "interpret_tpu" if backend == "interpret" else backend
    if impl == "interpret":
        return "interpret_tpu"
    return impl


def split_impl(impl: str | None) -> tuple[str, bool]:
    """``impl`` → (``"ref"`` | ``"gpu"`` | ``"tpu"``, interpret flag)."""
    impl = resolve_impl(impl)
    if impl == "ref":
        return "ref", False
    kind, target = impl.split("_")
    return target, kind == "interpret"


def tpu_interpret_arg(interpret: bool):
    """The ``interpret=`` value for a Mosaic TPU ``pallas_call``: the TPU interpreter (simulated
    VMEM/DMA, out-of-bounds reads raise, uninitialized memory is NaN) when interpreting."""
    if not interpret:
        return False
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def gpu_kernel_family(env_var: str) -> str:
    """Which kernel family a GPU op takes, from ``$env_var``: "triton" (default; measured on the
    H200) or "mosaic_gpu" (the wgmma kernels, opt-in until measured). Read when a function is
    traced, so a process sets it before its first call; an unknown value is a one-line error."""
    v = os.environ.get(env_var, "triton").strip().lower() or "triton"
    if v not in ("triton", "mosaic_gpu"):
        raise ValueError(f"${env_var}={v!r}: expected triton or mosaic_gpu")
    return v


def export_for_gpu(fn, *args, device_kind: str = "NVIDIA H200", num_cores: int = 132):
    """``jax.export`` of ``jax.jit(fn)(*args)`` for CUDA, on any host (no GPU needed): the Pallas
    kernels are lowered for ``device_kind`` (Triton kernels to Triton IR for its compute
    capability, Mosaic GPU kernels through Mosaic's layout inference and TMA checks), so a shape,
    layout or routing error shows up here rather than on a lent GPU. What it cannot check is the
    final PTX compile. ``args`` may be ``jax.ShapeDtypeStruct``s. Returns the ``Exported``."""
    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    mesh = AbstractMesh((1,), ("gpu",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind, num_cores, "gpu"))
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with use_abstract_mesh(mesh):
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args)


def exported_kernels(exp) -> dict[str, int]:
    """Kernel counts in an :func:`export_for_gpu` result: Triton kernels by their Pallas name, and
    ``"mosaic_gpu"`` for the Mosaic GPU custom calls."""
    import collections
    import re

    text = exp.mlir_module()
    counts = collections.Counter(re.findall(r'xla\.gpu\.triton\(.*?name = "(\w+)"', text))
    counts["mosaic_gpu"] = len(re.findall(r"custom_call @mosaic_gpu", text))
    return dict(counts)
