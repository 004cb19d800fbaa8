"""``jaxbn bench``: jaxbn against Flax, PyTorch and the memory-bandwidth floor.

Every contender runs on the same tensor, interleaved round-robin in one
process, so that machine noise hits all of them alike; the report gives
medians with min/max. The floor is measured, not assumed: a jitted copy
(one read, one write) and a jitted sum (one read) of the same tensor, and

* eval: one read, one write (copy);
* train forward: statistics (one read) and the output (copy);
* train forward+backward: the forward, then two sums over x and dy (two
  reads) and dx (two reads, one write): 3 copies and 2 sums.

Outputs are deleted before the next call, so the allocator reuses their
pages instead of faulting in fresh ones; the minor page faults per call are
counted and reported so that any left are visible.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import math
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen
import jax
import jax.numpy as jnp

from ._functional import BatchStats, batch_norm
from ._torch import optional_torch

MODES = ("eval", "train", "train+grad")
LAYOUTS = ("nchw", "nhwc")
BURST = 3  # timed calls per contender per round, after one untimed call
SHAPES = {
    "32x64x56x56": (32, 64, 56, 56),
    "32x256x14x14": (32, 256, 14, 14),
    "256x512x7x7": (256, 512, 7, 7),
    "8x16x8x8": (8, 16, 8, 8),
}


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call of one contender on one (shape, layout, mode)."""

    shape: str
    layout: str
    mode: str
    contender: str
    median: float
    low: float
    high: float
    faults_per_call: float
    compile_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Runner = Callable[[], Any]
# (x, scale, bias, stats) -> (y, new statistics)
Forward = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def _jax_contenders(
    shape: tuple[int, ...], layout: str, mode: str
) -> dict[str, tuple[Runner, float]]:
    """``{name: (call, compile seconds)}`` for the JAX contenders and probes."""
    axis = 1 if layout == "nchw" else 3
    dims = shape if layout == "nchw" else (shape[0], shape[2], shape[3], shape[1])
    channels = shape[1]
    key = jax.random.key(0)
    x = jax.random.normal(key, dims, jnp.float32) * 2 + 3
    dy = jax.random.normal(jax.random.fold_in(key, 1), dims, jnp.float32)
    scale, bias = jnp.ones(channels), jnp.zeros(channels)
    stats = BatchStats.create(channels)

    def jaxbn_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, stats: Any) -> Any:
        return batch_norm(x, stats, scale, bias, training=mode != "eval", axis=axis)

    def flax_forward(fast: bool) -> Forward:
        layer = flax.linen.BatchNorm(
            use_running_average=mode == "eval", axis=axis, momentum=0.9, use_fast_variance=fast
        )

        def forward(x: jax.Array, scale: jax.Array, bias: jax.Array, stats: Any) -> Any:
            variables = {
                "params": {"scale": scale, "bias": bias},
                "batch_stats": {"mean": stats.mean, "var": stats.var},
            }
            return layer.apply(variables, x, mutable=["batch_stats"])

        return forward

    forwards: dict[str, Forward] = {"jaxbn": jaxbn_forward, "flax": flax_forward(True)}
    if mode != "eval":
        forwards["flax two-pass"] = flax_forward(False)

    def with_grad(forward: Forward) -> Callable[..., Any]:
        def step(x: jax.Array, scale: jax.Array, bias: jax.Array, stats: Any, dy: jax.Array) -> Any:
            _y, vjp, new_stats = jax.vjp(
                lambda x, scale, bias: forward(x, scale, bias, stats), x, scale, bias, has_aux=True
            )
            return vjp(dy), new_stats

        return step

    def without_grad(forward: Forward) -> Callable[..., Any]:
        return lambda x, scale, bias, stats, dy: forward(x, scale, bias, stats)

    functions: dict[str, Callable[..., Any]] = {
        name: with_grad(f) if mode == "train+grad" else without_grad(f)
        for name, f in forwards.items()
    }
    reduce_axes = tuple(i for i in range(4) if i != axis)
    functions["copy (floor)"] = lambda x, *_: x * 1.0
    functions["sum (floor)"] = lambda x, *_: jnp.sum(x, axis=reduce_axes)
    # Everything is an argument, never a closure: captured arrays become
    # constants, computed eagerly while tracing and folded into the program.
    args = (x, scale, bias, stats, dy)
    return {name: _donating_runner(f, args) for name, f in functions.items()}


def _donating_runner(f: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Runner, float]:
    """A call of jitted ``f`` that hands its previous full-size output back.

    The spare buffer is donated, so XLA writes the new output into the same
    pages: no fresh allocation, no page faults on it. Also returns the
    seconds that ``jax.jit(f).lower(...).compile()`` takes (trace and XLA
    compile of ``f`` alone, without the spare buffer).
    """
    start = time.perf_counter()
    plain = jax.jit(f).lower(*args).compile()
    seconds = time.perf_counter() - start
    full_size = args[0]
    output_shapes = [leaf.shape for leaf in jax.tree.leaves(jax.eval_shape(f, *args))]
    if full_size.shape not in output_shapes:  # nothing to write into a spare buffer
        return (lambda: plain(*args)), seconds

    def with_spare(spare: jax.Array, *args: Any) -> Any:
        del spare  # only its buffer is wanted, for the output
        return f(*args)

    donating = jax.jit(with_spare, donate_argnums=0, keep_unused=True)
    compiled = donating.lower(full_size, *args).compile()
    spare = [jnp.zeros_like(full_size)]

    def run() -> Any:
        out = compiled(spare[0], *args)
        spare[0] = next(leaf for leaf in jax.tree.leaves(out) if leaf.shape == full_size.shape)
        return out

    return run, seconds


def _torch_contenders(
    shape: tuple[int, ...], layout: str, mode: str
) -> dict[str, tuple[Runner, float]]:
    torch = optional_torch()
    if torch is None:
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory_format = torch.contiguous_format if layout == "nchw" else torch.channels_last
    name = "torch NCHW" if layout == "nchw" else "torch channels_last"
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 2 + 3).to(device, memory_format=memory_format)
    dy = torch.randn(shape, generator=generator).to(device, memory_format=memory_format)
    layer = torch.nn.BatchNorm2d(shape[1]).to(device, memory_format=memory_format)
    layer.train(mode != "eval")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward() -> Any:
        with torch.no_grad():
            y = layer(x)
        sync()
        return y

    def forward_backward() -> Any:
        xg = x.detach().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        layer(xg).backward(dy)
        sync()
        return xg.grad

    return {name: (forward_backward if mode == "train+grad" else forward, 0.0)}


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks instead of returning them to the OS.

    Large buffers are otherwise mmap'ed fresh and unmapped on free, and every
    call pays page faults for its outputs, more than some kernels take.
    Returns False where glibc's mallopt is not available.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    )


def measure(
    shape_name: str, layout: str, mode: str, reps: int, *, with_torch: bool = True
) -> list[Timing]:
    """Interleaved timings of every contender on one (shape, layout, mode)."""
    shape = SHAPES[shape_name]
    contenders = _jax_contenders(shape, layout, mode)
    if with_torch:
        contenders |= _torch_contenders(shape, layout, mode)
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    faults: dict[str, int] = dict.fromkeys(contenders, 0)
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for name, (run, _) in contenders.items():
                # One untimed call first: an idle thread pool wakes up slowly,
                # and every contender should meet a warm machine.
                _block(run())
                for _ in range(BURST):
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start = time.perf_counter()
                    out = _block(run())
                    runs[name].append(time.perf_counter() - start)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                    del out
    finally:
        gc.enable()
    reps *= BURST
    return [
        Timing(
            shape_name,
            layout,
            mode,
            name,
            statistics.median(times),
            min(times),
            max(times),
            faults[name] / reps,
            contenders[name][1] if contenders[name][1] else None,
        )
        for name, times in runs.items()
    ]


def _block(out: Any) -> Any:
    return jax.block_until_ready(out) if not hasattr(out, "detach") else out


def floor_seconds(timings: Iterable[Timing]) -> dict[tuple[str, str, str], float]:
    """The bandwidth floor of each (shape, layout, mode) from the probes."""
    probes: dict[tuple[str, str, str], dict[str, float]] = {}
    for t in timings:
        probes.setdefault((t.shape, t.layout, t.mode), {})[t.contender] = t.median
    floors = {}
    for key, p in probes.items():
        copy, total = p["copy (floor)"], p["sum (floor)"]
        floors[key] = {"eval": copy, "train": copy + total, "train+grad": 3 * copy + 2 * total}[
            key[2]
        ]
    return floors


def bytes_moved(shape: tuple[int, ...], mode: str) -> int:
    """Bytes the floor moves (float32): the unit of the GB/s column."""
    tensor = math.prod(shape) * 4
    return tensor * {"eval": 2, "train": 3, "train+grad": 8}[mode]


# One convention for every ratio printed or saved: a time over a reference
# time, as in "x floor". Above 1 means slower than the reference.
RATIO_CONVENTION = {
    "x floor": "contender time / bandwidth-floor time (above 1: slower than the floor)",
    "x jaxbn": "contender time / jaxbn time (above 1: slower than jaxbn, i.e. jaxbn is faster)",
}
TARGET_SHAPE = "32x64x56x56"  # the shape the performance targets are set for


def format_report(timings: list[Timing]) -> str:
    """One table per (shape, layout, mode), then the targets.

    Columns ``x floor`` and ``x jaxbn`` are the contender's time over the
    floor's and over jaxbn's (see :data:`RATIO_CONVENTION`).
    """
    floors = floor_seconds(timings)
    groups: dict[tuple[str, str, str], list[Timing]] = {}
    for t in timings:
        groups.setdefault((t.shape, t.layout, t.mode), []).append(t)
    lines = []
    for key, group in groups.items():
        shape, layout, mode = key
        floor = floors[key]
        mine = next(t.median for t in group if t.contender == "jaxbn")
        lines.append(f"\n{shape} {layout} {mode}: floor {floor * 1e3:.3f} ms")
        lines.append(
            f"  {'contender':22} {'median ms':>10} {'min':>8} {'max':>8} {'GB/s':>7} "
            f"{'x floor':>8} {'x jaxbn':>8} {'faults':>7} {'compile ms':>10}"
        )
        for t in group:
            gbps = bytes_moved(SHAPES[shape], mode) / t.median / 1e9
            compile_ms = f"{t.compile_seconds * 1e3:.0f}" if t.compile_seconds else "-"
            lines.append(
                f"  {t.contender:22} {t.median * 1e3:10.3f} {t.low * 1e3:8.3f} {t.high * 1e3:8.3f} "
                f"{gbps:7.1f} {t.median / floor:8.2f} {t.median / mine:8.2f} "
                f"{t.faults_per_call:7.1f} {compile_ms:>10}"
            )
    lines.append("\n" + format_targets(timings))
    return "\n".join(lines)


def targets(timings: list[Timing], shape: str = TARGET_SHAPE) -> list[tuple[str, float, str, bool]]:
    """The performance targets: ``(what, measured value, bar, met)``.

    Only for ``shape``, and only what this run timed: no rows when ``shape``
    was not timed. Ratios against a contender are the contender's time over
    jaxbn's (above 1: jaxbn is faster), as in the ``x jaxbn`` column.
    """
    by = {(t.layout, t.mode, t.contender): t for t in timings if t.shape == shape}
    floors = floor_seconds(timings)
    rows = []

    def ratio(layout: str, mode: str, other: str) -> float | None:
        if (layout, mode, other) not in by or (layout, mode, "jaxbn") not in by:
            return None
        return by[(layout, mode, other)].median / by[(layout, mode, "jaxbn")].median

    for layout in LAYOUTS:
        torch_here = "torch NCHW" if layout == "nchw" else "torch channels_last"
        checks = [
            ("train", "flax", f"train fwd vs Flax fast ({layout})", 1.0),
            ("train", "flax two-pass", f"train fwd vs two-pass ({layout})", 1.4),
            ("train+grad", "flax", f"fwd+bwd vs jax.grad(Flax) ({layout})", 1.4),
        ]
        if layout == "nchw":
            checks.append(("train", "torch NCHW", "train fwd vs torch NCHW", 2.0))
        else:
            checks.append(("train+grad", torch_here, "fwd+bwd vs torch channels_last", 1.0))
        for mode, other, what, bar in checks:
            r = ratio(layout, mode, other)
            if r is not None:
                rows.append((what, r, f">= {bar:g}x faster" if bar > 1 else "no slower", r >= bar))
        if (layout, "eval", "jaxbn") in by:
            r = by[(layout, "eval", "jaxbn")].median / floors[(shape, layout, "eval")]
            rows.append((f"eval vs bandwidth floor ({layout})", r, "<= 1.3x floor", r <= 1.3))
    compiles = [
        t.compile_seconds
        for t in by.values()
        if t.contender == "jaxbn" and t.mode == "train+grad" and t.compile_seconds
    ]
    if compiles:
        worst = max(compiles)
        rows.append(("compile one train step (s)", worst, "< 0.150 s", worst < 0.150))
    return rows


def format_targets(timings: list[Timing]) -> str:
    rows = targets(timings)
    if not rows:
        return (
            f"targets: set for {TARGET_SHAPE}, which this run did not time "
            f"(add --shape {TARGET_SHAPE})"
        )
    lines = [
        f"targets ({TARGET_SHAPE}; ratio = contender time / jaxbn time, above 1: jaxbn faster):"
    ]
    for what, value, bar, met in rows:
        lines.append(f"  {'met ' if met else 'MISS'} {what:40} {value:7.3f}  ({bar})")
    return "\n".join(lines)


def targets_json(timings: list[Timing]) -> list[dict[str, Any]]:
    """:func:`targets` as JSON records, each saying what its value is."""
    return [
        {
            "target": what,
            "shape": TARGET_SHAPE,
            "value": value,
            "value_is": "seconds"
            if what.startswith("compile")
            else ("jaxbn time / floor time" if "floor" in what else "contender time / jaxbn time"),
            "bar": bar,
            "met": met,
        }
        for what, value, bar, met in targets(timings)
    ]


def run(
    shapes: Iterable[str] = tuple(SHAPES),
    layouts: Iterable[str] = LAYOUTS,
    modes: Iterable[str] = MODES,
    reps: int = 15,
    *,
    with_torch: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[Timing]:
    keep_freed_memory()
    timings = []
    for shape in shapes:
        for layout in layouts:
            for mode in modes:
                if progress is not None:
                    progress(f"{shape} {layout} {mode}")
                timings += measure(shape, layout, mode, reps, with_torch=with_torch)
    return timings


def environment(*, with_torch: bool = True) -> Mapping[str, str]:
    """What the timings were taken on."""
    info = {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu count": str(os.cpu_count()),
        "page faults": "kept off (freed memory reused)" if keep_freed_memory() else "counted",
    }
    if with_torch:
        torch = optional_torch()
        info["torch"] = (
            "not installed"
            if torch is None
            else f"{torch.__version__} ({torch.get_num_threads()} threads)"
        )
    return info
