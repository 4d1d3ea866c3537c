"""Plumbing shared by the kernel modules: importing Triton, choosing the implementation, launch configs.

Nothing here is a kernel. The three ideas a reader needs:

- `INTERPRETED` says whether the kernels were *defined* under `TRITON_INTERPRET=1` (Triton reads the variable when
  `@triton.jit` runs, i.e. when `lessons_lib.kernels` is first imported). Then they run on CPU tensors, slowly.
- `use_triton(impl, *tensors)` turns `impl="auto"|"triton"|"torch"` into a yes/no with a clear error when the
  Triton path cannot run. `auto` = Triton on CUDA tensors or in the interpreter, else the torch reference.
- `tuned(kernel, configs, key, interpreter=...)` makes a `Launcher`: it autotunes over a few launch configs on a
  GPU (the first launch of each key), then launches with the config it picked, without the autotuner's per-call
  Python; the interpreter cannot time anything, so there it launches with its own config (big blocks: few Python
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
    first, *others = tensors.values()
    if any(t.device != first.device for t in others):  # (runs on every call: kept cheap)
        raise ValueError(f"{op}: tensors on different devices: "
                         + ", ".join(f"{k} on {t.device}" for k, t in tensors.items()))


_SMS: dict = {}


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU (1 in the interpreter): persistent kernels launch a few programs per SM.
    Asked once per device (a backward pass calls this on every call, possibly inside a CUDA graph capture)."""
    if device.type != "cuda" or INTERPRETED:
        return 1
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


AUTOTUNE = True  # False: GPU launches use the first config (the GPU tests turn tuning off to save compile time)


def _unwrap(kernel):
    """The innermost `@triton.jit` function under `kernel`, and the rules of the `@triton.heuristics` around it."""
    heuristics = {}
    while hasattr(kernel, "fn") and hasattr(kernel, "values"):  # a triton.runtime.Heuristics
        heuristics = {**kernel.values, **heuristics}
        kernel = kernel.fn
    return kernel, heuristics


class Launcher:
    """`launcher[grid](*args)` runs `kernel` with one of `configs` (meta-parameters such as block sizes + num_warps).

    On a GPU it autotunes: the first launch for each distinct value of the `key` arguments (and dtypes) goes through
    Triton's autotuner, which times every config and keeps the fastest; with AUTOTUNE off it uses the first config.
    The interpreter cannot time anything: there it uses `interpreter`, the config cheapest to interpret (large
    blocks), or the first config. `with launcher.using(config)` forces a config (tests run every one). Only tune
    kernels that are pure functions of their inputs: the tuner launches them several times.

    Why not call the autotuner every time: its `run` rebuilds dictionaries of every argument on each call (and
    `@triton.heuristics` does so again), tens of microseconds of Python per launch for a kernel with 30 arguments,
    while the kernel itself may run for a few microseconds. So after the first launch of a key this class launches
    the `@triton.jit` function directly, with the config the tuner picked and the heuristics' values, both cached.
    That needs heuristics that depend only on the `key` arguments and the config (checked: anything else raises).
    `grid` is a tuple, or a function of the meta-parameters (`meta["BLOCK_M"]`) as in Triton.
    """

    def __init__(self, kernel, configs: list, key: list[str], interpreter=None):
        self.kernel, self.configs, self.key = kernel, configs, key
        self.interpreter = interpreter or configs[0]
        self.jit, self.heuristics = _unwrap(kernel)
        names = list(getattr(self.jit, "arg_names", []))
        missing = [k for k in key if k not in names]
        if HAS_TRITON and missing:
            raise ValueError(f"Launcher({getattr(self.jit, '__name__', self.jit)}): key {missing} not among the "
                             f"kernel's arguments {names}")
        self._key_at = [(name, names.index(name)) for name in key] if HAS_TRITON else []
        self._pointers_at = [i for i, name in enumerate(names) if name.endswith("_ptr")]  # tensors, by convention
        self._autotuner = None
        self._forced = None
        self.picked: dict = {}  # tuning key (key values + dtypes) -> the config the autotuner picked
        self._meta: dict = {}  # (key values, config) -> meta-parameters and options for the jit function

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict):
        key_values = tuple(args[i] if i < len(args) else kwargs[name] for name, i in self._key_at)
        if INTERPRETED:
            config = self._forced or self.interpreter
        elif self._forced is not None or not AUTOTUNE or len(self.configs) == 1:
            config = self._forced or self.configs[0]
        else:
            pointers = self._pointers_at
            dtypes = ([args[i].dtype for i in pointers] if len(args) > pointers[-1] else  # the usual: positional
                      [(args[i] if i < len(args) else kwargs[self.jit.arg_names[i]]).dtype for i in pointers])
            tuning_key = (key_values, tuple(dtypes))  # as Triton's autotuner: the key's values and the dtypes
            config = self.picked.get(tuning_key)
            if config is None:  # first launch for this key: Triton's autotuner times the configs (and launches)
                if self._autotuner is None:
                    self._autotuner = triton.autotune(configs=self.configs, key=self.key)(self.kernel)
                result = self._autotuner[grid](*args, **kwargs)
                picked = getattr(self._autotuner, "best_config", None)  # Triton 3.x records the config it used
                if picked is not None:
                    self.picked[tuning_key] = picked
                return result
        meta = self._meta.get((key_values, id(config)))
        if meta is None:
            meta = self._meta[(key_values, id(config))] = self._meta_parameters(config, key_values)
        return self.jit.run(*args, grid=grid(meta) if callable(grid) else grid, warmup=False, **kwargs, **meta)

    def _meta_parameters(self, config, key_values: tuple) -> dict:
        """The config's block sizes, the heuristics' values and the launch options (num_warps, ...) for one key."""
        known = {**dict(zip(self.key, key_values)), **config.kwargs}
        meta = dict(config.kwargs)
        for name, rule in self.heuristics.items():
            try:
                meta[name] = rule(_KeyOnly(known))
            except KeyError as err:
                raise KeyError(f"{getattr(self.jit, '__name__', 'kernel')}: heuristic {name} reads {err}, which is "
                               f"neither in the launcher's key {self.key} nor in the config; the launcher caches "
                               "heuristics per key, so add it to the key") from None
        all_kwargs = config.all_kwargs() if hasattr(config, "all_kwargs") else {"num_warps": config.num_warps}
        meta.update({k: v for k, v in all_kwargs.items() if k not in config.kwargs})  # as the autotuner passes them
        return meta

    @contextlib.contextmanager
    def using(self, config):
        """Launch with `config` inside the block (tests run every config this way)."""
        previous, self._forced = self._forced, config
        try:
            yield
        finally:
            self._forced = previous


class _KeyOnly(dict):
    """The arguments a heuristic may read (the key and the config); any other name raises KeyError naming it."""

    def __missing__(self, name):
        raise KeyError(name)


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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grids. (`triton.cdiv` is a constexpr function: several microseconds per host call.)"""
    return -(-a // b)
