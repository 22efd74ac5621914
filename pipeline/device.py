"""Device and numeric precision: what runs where, and in which floating-point format.

``auto`` precision picks bf16 where the hardware computes it natively (CUDA, and CPUs
with AVX512-BF16 or AMX) and fp32 elsewhere: emulated bf16 is slower than fp32.
The resolved precision is part of the cache key: fp32 and bf16 features never mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import TlpInputError
from .settings import PRECISIONS

__all__ = [
    "PRECISIONS", "resolve_device", "resolve_precision", "autocast", "cpu_has_native_bf16",
    "tune_cpu_allocator", "default_workers", "kernel_family", "image_threads",
]

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists avx512_bf16 or amx_bf16 (Linux only)."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


# The instruction-set extensions that decide which convolution and matmul kernels oneDNN
# and ATen pick on a CPU, and so the last bits of the features (the summation order and
# fused multiply-adds differ between kernel families).
_KERNEL_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                 "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
                 "asimd", "sve", "sve2", "bf16", "i8mm")
_KERNEL_ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE")


def kernel_family(device: torch.device) -> dict:
    """What decides which compute kernels run, for the cache key.

    On a CPU: ATen's dispatch level (``torch.backends.cpu.get_cpu_capability()``), the
    CPU's instruction-set flags that oneDNN chooses its kernels by, and the environment
    variables that cap either. Two machines that differ here compute features that
    differ in the last bits (up to a few percent of a row's norm was measured under
    ``ONEDNN_MAX_CPU_ISA=AVX2``), so a cache folder shared between them must not serve
    one machine's rows to the other. On CUDA: the GPU's name and compute capability.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"gpu": torch.cuda.get_device_name(index),
                "capability": list(torch.cuda.get_device_capability(index))}
    return {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "isa": sorted(_cpu_flags() & set(_KERNEL_FLAGS)),
        "environment": {name: os.environ[name] for name in _KERNEL_ENVIRONMENT if name in os.environ},
    }


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` means CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise TlpInputError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TlpInputError(f"--device {name} was asked for but CUDA is not available; pass --device cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """Map ``auto`` to ``bf16`` or ``fp32`` for this device; validate the others."""
    if name not in PRECISIONS:
        raise TlpInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def default_workers(workers: int | None, device: torch.device) -> int:
    """Decoding processes: ``workers`` if given, else 0 on a CPU (the forward or training
    step already keeps every core busy; decoding between steps in threads is faster there)
    and up to 8 on CUDA (decoding overlaps the GPU's work)."""
    if workers is not None:
        return workers
    return 0 if device.type == "cpu" else max(1, min(8, os.cpu_count() or 1))


def autocast(device: torch.device, precision: str):
    """An autocast context for bf16/fp16, a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


@functools.lru_cache(maxsize=1)
def tune_cpu_allocator() -> bool:
    """Keep large freed blocks in glibc's heap instead of handing them back to the kernel.

    By default glibc serves allocations above a (dynamic, at most 32 MiB) threshold with
    fresh ``mmap`` pages and unmaps them on free, so every batch's activations are paged
    in and zeroed again. Measured on 2 cores with efficientnet_lite0 at 224 px, bf16:
    75 img/s at batch 64 with the default, 178 img/s with these two settings. The cost is
    that up to 512 MiB of freed memory stays with the process. Process-wide, applied
    once, on Linux/glibc only; ``TLP_MALLOC_TUNING=0`` turns it off.
    """
    if os.environ.get("TLP_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    ok = bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(libc.mallopt(m_trim_threshold, 512 << 20))
    logger.debug("glibc allocator tuned for large blocks: %s", ok)
    return ok


@functools.lru_cache(maxsize=1)
def _openmp_backend() -> bool:
    """Whether torch parallelises with OpenMP, whose thread count is kept per thread."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextlib.contextmanager
def image_threads(max_workers: int | None = None):
    """A thread pool (one thread per core by default) for per-image work beside the
    network: decoding, resizing, augmenting. Each of its threads runs torch's operators
    on one thread of its own. Otherwise every thread that calls an operator (a resize)
    starts an OpenMP team as large as the main thread's, whose threads spin on after it
    and take the cores from the training step or forward pass that follows: measured on
    2 cores (efficientnet_lite0, 128 px, batch 32, 320 images, 4 epochs), training took
    16.1-17.8 s against 17.9-20.4 s, the later epochs 78-85 img/s against 60-75, where the
    bare step on decoded tensors runs 85. (A resize's pixels do not depend on its
    thread count; DataLoader worker processes run one thread each for the same reason.)

    OpenMP builds only (torch's default on Linux, Windows and macOS wheels), where the
    count is per thread; with torch's native pool the count is shared and left alone.
    """
    single = _openmp_backend()
    main_threads = torch.get_num_threads()  # also settles this thread's own count first
    pool = ThreadPoolExecutor(max_workers=max(1, max_workers or os.cpu_count() or 1),
                              initializer=torch.set_num_threads if single else None,
                              initargs=(1,) if single else ())
    try:
        yield pool
    finally:
        pool.shutdown(wait=True)
        if single:  # torch also keeps the last count set as the default of threads started later
            torch.set_num_threads(main_threads)
