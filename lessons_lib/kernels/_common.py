"""Plumbing shared by the kernel modules: importing Triton, choosing the implementation, launch configs.

Nothing here is a kernel. The three ideas a reader needs:

- `INTERPRETED` says whether the kernels were *defined* under `TRITON_INTERPRET=1` (Triton reads the variable when
  `@triton.jit` runs, i.e. when `lessons_lib.kernels` is first imported). Then they run on CPU tensors, slowly.
- `use_triton(impl, *tensors)` turns `impl="auto"|"triton"|"torch"` into a yes/no with a clear error when the
  Triton path cannot run. `auto` = Triton on CUDA tensors or in the interpreter, else the torch reference.
- `tuned(kernel, configs, key, interpreter=...)` makes a `Launcher`: it autotunes over a few launch configs on a
  GPU; the interpreter cannot time anything, so there it launches with its own config (big blocks: few Python
  steps). `python kernels/compile_check.py` compiles every config for a GPU, without one, and shows its registers.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # e.g. macOS: no Triton wheel. The torch references still work; kernels are never launched.
    HAS_TRITON = False

    class _NoTriton:
        """Just enough for the kernel definitions below to parse: `@triton.jit` and `tl.constexpr`."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def heuristics(_):
            return lambda f: f

    triton = tl = _NoTriton()

IMPLS = ("auto", "triton", "torch")

if HAS_TRITON:

    @triton.jit
    def _probe():  # defined only to ask Triton which kind of function `@triton.jit` makes in this process
        pass

    INTERPRETED = type(_probe).__name__ == "InterpretedFunction"
else:
    INTERPRETED = False


def use_triton(impl: str, *tensors: torch.Tensor, op: str) -> bool:
    """True if `op` should run its Triton kernels for these tensors, False for the torch reference."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "torch":
        return False
    if impl == "auto":
        return HAS_TRITON and (on_cuda or INTERPRETED)
    if not HAS_TRITON:
        raise RuntimeError(f"{op}(impl='triton'): Triton is not installed; use impl='torch'")
    if not on_cuda and not INTERPRETED:
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"{op}(impl='triton') got tensors on {devices}: Triton needs CUDA tensors, or the Triton interpreter on "
            "CPU. Set TRITON_INTERPRET=1 before lessons_lib.kernels is first imported "
            "(lessons_lib.course.setup_lesson() does it on a machine without a GPU), or use impl='torch'.")
    return True


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: tensors on different devices: " + ", ".join(f"{k} on {v}" for k, v in devices.items()))


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU (1 in the interpreter): persistent kernels launch a few programs per SM."""
    if device.type == "cuda" and not INTERPRETED:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


AUTOTUNE = True  # False: GPU launches use the first config (the GPU tests turn tuning off to save compile time)


class Launcher:
    """`launcher[grid](*args)` runs `kernel` with one of `configs` (meta-parameters such as block sizes + num_warps).

    On a GPU it autotunes: the first launch for each distinct value of the `key` arguments (and dtypes) times every
    config and keeps the fastest; with AUTOTUNE off it uses the first config. The interpreter cannot time anything:
    there it uses `interpreter`, the config cheapest to interpret (large blocks), or the first config.
    `with launcher.using(config)` forces a config (tests run every one). Only tune kernels that are pure functions
    of their inputs: the tuner launches them several times.
    """

    def __init__(self, kernel, configs: list, key: list[str], interpreter=None):
        self.kernel, self.configs, self.key = kernel, configs, key
        self.interpreter = interpreter or configs[0]
        self._autotuner = None
        self._forced = None

    def __getitem__(self, grid):
        if INTERPRETED or not AUTOTUNE or self._forced is not None:
            config = self._forced or (self.interpreter if INTERPRETED else self.configs[0])
            options = {} if INTERPRETED else {"num_warps": config.num_warps}
            return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **config.kwargs, **options)
        if self._autotuner is None:
            self._autotuner = triton.autotune(configs=self.configs, key=self.key)(self.kernel)
        return self._autotuner[grid]

    @contextlib.contextmanager
    def using(self, config):
        """Launch with `config` inside the block (tests run every config this way)."""
        previous, self._forced = self._forced, config
        try:
            yield
        finally:
            self._forced = previous


def tuned(kernel, configs: list, key: list[str], interpreter=None) -> Launcher:
    return Launcher(kernel, configs, key, interpreter)


def config(num_warps: int = 4, **meta):
    """A launch config: meta-parameters (block sizes) plus `num_warps` (ignored by the interpreter)."""
    if not HAS_TRITON:
        return _Config(meta)
    return triton.Config(meta, num_warps=num_warps)


class _Config:
    def __init__(self, kwargs):
        self.kwargs, self.num_warps = kwargs, 4


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
