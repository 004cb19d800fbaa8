"""A port as Flax source a person reads and edits: one class per traced torch class.

The programs of a :class:`PortedModule` are flat (one node per op, in the
order torch ran them), but every node knows the torch modules whose forward
it ran in (:attr:`Node.scope`). The source is cut along them: each traced
torch module becomes a ``flax.linen`` class whose ``__call__`` is its
forward; leaf modules (convolutions, BatchNorm, ...) are built where they
are called, at their torch attribute names, so the variables are the port's.

Instances of one torch class that compute the same thing with other numbers
(ResNet's ``BasicBlock`` at 64 and at 128 channels) are one class: the
numbers that differ become its fields, the rest stay literals. Instances
whose computation differs (a block with a ``downsample`` branch) become a
class of their own, named after what they add (``BasicBlockWithDownsample``).
A module whose forward differs between training and eval (an auxiliary head)
reads ``if train:``. Depends on jax, flax and numpy only: a saved port is
regenerated and run without torch.
"""

from __future__ import annotations

import base64
import builtins
import collections
import dataclasses
import functools
import inspect
import keyword
import math
import pathlib
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterable
from typing import Any, cast

import jax.numpy as jnp
import numpy as np

from .. import _frozen, _functional, _linen
from ._errors import PortError
from ._layers import Op, batch_norm_call, plain_call, train_call
from ._module import REQUIRED, Node, PortedModule, Program, Ref, ref_names

_HOLE = re.compile("\x00(\\d+)\x00")  # a literal that may differ between instances
_CHILD = re.compile("\x01(\\d+):(\\d+)\x01")  # a child class's fields: (group, first hole)
# Arguments written out even where they equal the default: what a reader checks first.
_KEEP = frozenset({"eps", "momentum", "groups", "ceil_mode", "mode", "align_corners"})
_IMPORTS = {
    "functools": "import functools",
    "nn": "import flax.linen as nn",
    "jnp": "import jax.numpy as jnp",
    "np": "import numpy as np",
    "jaxbn": "import jaxbn",
    "layers": "",
    "ops": "",
}
_RESERVED = frozenset({*_IMPORTS, "self", "train", "jax"})
_BUILTINS = frozenset(dir(builtins))


_INLINE = 64  # constant arrays with more elements are written packed (zlib, base64)


def _packed(value: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(value).tobytes(), 9)).decode()


class _Unrenderable(Exception):
    """A value the source cannot spell (a user's converter, a closure)."""


@functools.cache
def _known() -> dict[int, str]:
    """id(object) -> its public spelling, for every op, layer and jaxbn name."""
    from . import layers, ops

    # (jaxbn's names a port runs, from their modules: the package root imports this one)
    names = {id(value): f"jaxbn.{value.__name__}" for value in _JAXBN_NAMES}
    for prefix, package in (("layers", layers), ("ops", ops)):
        for name in package.__all__:
            value = getattr(package, name)
            if callable(value):
                names.setdefault(id(value), f"{prefix}.{name}")
    return names


_JAXBN_NAMES = (
    _linen.BatchNorm,
    _linen.BatchNorm1d,
    _linen.BatchNorm2d,
    _linen.BatchNorm3d,
    _frozen.FrozenBatchNorm2d,
    _functional.batch_norm,
)


def _spelling(value: Any) -> str | None:
    return _known().get(id(value))


def _literal(value: Any) -> str:
    """``value`` as Python source (a plain value, a dtype, an array, a known function)."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else '-float("inf")'
        return repr(value)
    spelled = _spelling(value)
    if spelled is not None:
        return spelled
    if value is Ellipsis:
        return "..."
    if type(value).__name__ == "device" and type(value).__module__ == "torch":
        return repr(str(value))  # (the ops take torch's device= and ignore it)
    if isinstance(value, slice):
        return f"slice({_literal(value.start)}, {_literal(value.stop)}, {_literal(value.step)})"
    if isinstance(value, np.ndarray):
        if value.size > _INLINE:  # (an index table torch computed at port time)
            return f"layers.constant({_packed(value)!r}, {value.shape!r}, {value.dtype.name!r})"
        return f"np.array({value.tolist()!r}, dtype=np.{value.dtype.name})"
    if isinstance(value, np.generic):
        return f"np.{value.dtype.name}({value.item()!r})"
    if isinstance(value, (np.dtype, type)) and _is_dtype(value):
        name = jnp.dtype(value).name
        return f"jnp.{name}" if name != "bool" else "jnp.bool_"
    if isinstance(value, functools.partial):
        parts = [_literal(value.func), *map(_literal, value.args)]
        parts += [f"{k}={_literal(v)}" for k, v in value.keywords.items()]
        return f"functools.partial({', '.join(parts)})"
    if isinstance(value, tuple) and type(value) is not tuple:  # a NamedTuple (Layer, Variable)
        spelled = _spelling(type(value))
        if spelled is None:
            raise _Unrenderable(value)
        return f"{spelled}({', '.join(map(_literal, value))})"
    if isinstance(value, tuple):
        items = [_literal(v) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, list):
        return f"[{', '.join(map(_literal, value))}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    raise _Unrenderable(value)


def _is_dtype(value: Any) -> bool:
    """A numpy dtype or a scalar type (``jnp.float32``), not Python's ``int``/``float``."""
    if isinstance(value, np.dtype):
        return True
    return isinstance(value, type) and (issubclass(value, np.generic) or hasattr(value, "dtype"))


def _plain(value: Any) -> bool:
    """A literal an instance may differ in (a channel count, a stride), not structure."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, tuple) and type(value) is tuple:
        return all(_plain(v) for v in value)
    return False


def _annotation(values: list[Any]) -> str:
    """The type of a field that holds ``values``."""
    kinds = {type(v) for v in values if v is not None}
    optional = " | None" if any(v is None for v in values) else ""
    if kinds <= {bool} and kinds:
        base = "bool"
    elif kinds <= {int} and kinds:
        base = "int"
    elif kinds <= {int, float} and kinds:
        base = "float"
    elif kinds == {str}:
        base = "str"
    elif kinds == {tuple}:
        base = "tuple"
    else:
        return "Any"
    return base + optional


def _identifier(text: str) -> str:
    text = re.sub(r"\W", "_", text)
    if not text or text[0].isdigit():
        text = f"m{text}"
    return text


# --- the flow of values between a module's call and its parent ---------------------


@dataclasses.dataclass
class _Flow:
    """Which node wrote each value a node reads, in one program."""

    position: dict[int, int]  # id(node) -> its index
    reads: list[tuple[int, str, int]]  # (reader index, name, writer index; -1: an input)

    @classmethod
    def of(cls, program: Program) -> _Flow:
        writer: dict[str, int] = {}
        reads = []
        for i, node in enumerate(program.nodes):
            for name in ref_names(node.args) + ref_names(node.kwargs):
                reads.append((i, name, writer.get(name, -1)))
            writer[node.name] = i
            if node.alias is not None:
                writer[node.alias] = i
        end = len(program.nodes)
        reads += [(end, name, writer.get(name, -1)) for name in ref_names(program.output)]
        return cls({id(n): i for i, n in enumerate(program.nodes)}, reads)

    def boundary(self, nodes: list[Node]) -> tuple[list[str], list[int]]:
        """The values a run of nodes reads from before it, and which of its nodes (by
        index in the run) write values read after it."""
        start, end = self.position[id(nodes[0])], self.position[id(nodes[-1])]
        inputs = [name for j, name, w in self.reads if start <= j <= end and w < start]
        outputs = {w - start for j, _, w in self.reads if j > end and start <= w <= end}
        return list(dict.fromkeys(inputs)), sorted(outputs)


# --- one body -------------------------------------------------------------------------


@dataclasses.dataclass
class _Child:
    """A call of a traced child module: its torch path, class, and nodes."""

    path: str
    torch_class: str
    nodes: list[Node]


def _split(nodes: list[Node], depth: int) -> list[Node | _Child]:
    """The nodes of one call at ``depth``: its own, and runs of a child's."""
    items: list[Node | _Child] = []
    for node in nodes:
        if len(node.scope) <= depth:
            items.append(node)
            continue
        path, cls = node.scope[depth]
        last = items[-1] if items else None
        if isinstance(last, _Child) and last.path == path:
            last.nodes.append(node)
        else:
            items.append(_Child(path, cls, [node]))
    return items


@dataclasses.dataclass
class _Body:
    """One ``__call__`` body as a template: literals that may differ are holes."""

    module: _Source
    path: str  # the torch path of the module whose forward this is
    holes: list[Any] = dataclasses.field(default_factory=list)
    names: list[list[str]] = dataclasses.field(default_factory=list)  # each hole's field names
    lines: list[str] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # value -> local name
    taken: set[str] = dataclasses.field(default_factory=lambda: set(_RESERVED))
    attributes: dict[str, None] = dataclasses.field(default_factory=dict)  # children, in order
    bound: dict[Any, str] = dataclasses.field(default_factory=dict)  # reused modules, variables
    # Children whose tensors this body reads itself: placed by scope (a name would
    # clash with the scope the read opens)
    read_at: frozenset[str] = frozenset()
    used: frozenset[str] = frozenset()  # the values something reads (unread: no name)
    reads: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def local(self, base: str, builtin: bool = False) -> str:
        """A fresh local name from ``base`` (a builtin's name only where ``builtin``:
        the forward's own parameter names, which callers may pass by keyword)."""
        base = _identifier(base)
        if keyword.iskeyword(base) or base in _RESERVED or (base in _BUILTINS and not builtin):
            base += "_"
        name, n = base, 1
        while name in self.taken:
            name, n = f"{base}_{n}", n + 1
        self.taken.add(name)
        return name

    def hole(self, value: Any, names: Iterable[str]) -> str:
        self.holes.append(value)
        self.names.append([_identifier(n) for n in names if n])
        return f"\x00{len(self.holes) - 1}\x00"

    def value(self, value: Any, names: Iterable[str] = ()) -> str:
        """An argument: a node's value by its local name, a literal as a hole."""
        if isinstance(value, Ref):
            return self.env[value.name]
        if _plain(value):
            return self.hole(value, names)
        if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
            items = [self.value(v, [f"{n}_{i}" for n in names]) for i, v in enumerate(value)]
            if isinstance(value, list):
                return f"[{', '.join(items)}]"
            return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {self.value(v)}" for k, v in value.items()) + "}"
        if isinstance(value, slice):
            parts = (value.start, value.stop, value.step)
            return f"slice({', '.join(self.value(v) for v in parts)})"
        return self.module.literal(value)

    def arguments(
        self, fn: Any, args: tuple[Any, ...], kwargs: Iterable[tuple[str, Any]], label: str
    ) -> list[str]:
        """``fn``'s arguments, each literal a hole named after its parameter."""
        try:
            parameters = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            parameters = []
        out = []
        for i, a in enumerate(args):
            name = parameters[i] if i < len(parameters) else f"arg{i}"
            out.append(self.value(a, [name, f"{label}_{name}"]))
        out += [f"{k}={self.value(v, [k, f'{label}_{k}'])}" for k, v in kwargs]
        return out

    def place(self, path: str) -> str:
        """``name=`` or ``parent=`` placing a module at the torch path ``path``."""
        relative = path[len(self.path) + 1 :] if self.path else path
        if self.path and not path.startswith(f"{self.path}."):
            raise _Unrenderable(f"{path} is called from {self.path}'s forward")
        if not relative:
            return "parent=self.scope"
        parts = tuple(relative.split("."))
        self.attributes[parts[0]] = None
        if len(parts) == 1 and parts[0] not in self.read_at:
            return f"name={parts[0]!r}"
        return f"parent=layers.scope(self, {_literal(parts)})"

    # --- statements ---------------------------------------------------------------

    def assign(self, node: Node, base: str, expression: str) -> None:
        if node.name not in self.used and node.alias not in self.used:
            self.lines.append(expression)  # (a check, or a value nothing reads)
            return
        name = self.local(base)
        self.lines.append(f"{name} = {expression}")
        self.env[node.name] = name
        if node.alias is not None:
            self.env[node.alias] = name

    def node(self, node: Node, calls: dict[str, int]) -> None:
        args, kwargs = node.args, node.kwargs
        if node.kind == "layer":
            base = node.target.rpartition(".")[2]
            if not base[:1].isalpha():  # ('0' in a Sequential: named for what it is)
                base = _snake(self.module.layers[node.target], "y")
            self.assign(node, base, self.layer(node.target, args, kwargs, calls))
        elif node.kind == "call":
            spelled = self.module.literal(node.target)
            label = spelled.rpartition(".")[2]
            parts = self.arguments(node.target, args, kwargs, label)
            if node.train_aware:
                parts += ["train=train", 'rng=lambda: self.make_rng("dropout")']
            self.assign(node, _snake_name(label), f"{spelled}({', '.join(parts)})")
        elif node.kind == "variable":
            path, variable, in_layer = node.target
            relative = tuple(path[len(self._flax_path()) :])
            if tuple(path[: len(self._flax_path())]) != self._flax_path():
                raise _Unrenderable(f"the tensor {'.'.join(path)} read from {self.path}")
            if relative:
                self.attributes[relative[0]] = None
            key = (relative, variable)
            if key in self.bound:
                self.env[node.name] = self.bound[key]
                return
            shape = self.hole(variable.shape, [f"{variable.name}_shape"])
            spelled = "layers.read" if in_layer else "layers.declare"
            fields = [*map(_literal, variable[:3]), shape, *map(_literal, variable[4:])]
            self.assign(
                node,
                variable.name,
                f"{spelled}(self, {_literal(relative)}, layers.Variable({', '.join(fields)}))",
            )
            self.bound[key] = self.env[node.name]
        else:
            self.assign(node, "constant", f"jnp.asarray({self.module.literal(node.target)})")

    def _flax_path(self) -> tuple[str, ...]:
        return tuple(self.path.split(".")) if self.path else ()

    def layer(self, path: str, args: Any, kwargs: Any, calls: dict[str, int]) -> str:
        layer = self.module.layers[path]
        make, call = layer.make, layer.call
        label = _identifier(path.rpartition(".")[2])
        inputs = [self.value(a) for a in args] + [f"{k}={self.value(v)}" for k, v in kwargs]
        if isinstance(make, functools.partial) and make.func is Op and not make.keywords:
            fn, *rest = make.args
            train_aware = bool(rest and rest[0])
            extra = ["train=train", 'rng=lambda: self.make_rng("dropout")'] if train_aware else []
            if isinstance(fn, functools.partial) and not fn.args and _spelling(fn.func):
                keywords = self._keywords(fn.func, fn.keywords, label)
                return f"{_spelling(fn.func)}({', '.join([*inputs, *keywords, *extra])})"
            if _spelling(fn) is not None:
                return f"{_spelling(fn)}({', '.join([*inputs, *extra])})"
        module = self.once(path, label, self.construct(make, path, label), calls)
        if call is plain_call:
            return f"{module}({', '.join(inputs)})"
        if call is train_call:
            return f"{module}({', '.join([*inputs, 'train=train'])})"
        if call is batch_norm_call:
            return f"{module}({', '.join([*inputs, 'use_running_average=not train'])})"
        if isinstance(call, functools.partial) and _spelling(call.func):
            prefix = [self.module.literal(a) for a in call.args]
            return f"{_spelling(call.func)}({', '.join([*prefix, module, 'train', *inputs])})"
        raise _Unrenderable(call)

    def once(self, path: str, label: str, constructor: str, calls: dict[str, int]) -> str:
        """A module the body calls more than once is constructed once, bound to a name
        (Flax names a submodule once per call); else ``constructor`` itself."""
        if calls[path] == 1:
            return constructor
        if path not in self.bound:
            self.bound[path] = self.local(f"{label}_module")
            self.lines.append(f"{self.bound[path]} = {constructor}")
        return self.bound[path]

    def construct(self, make: Any, path: str, label: str) -> str:
        """A leaf module's constructor: its class, its non-default settings, its place."""
        if not isinstance(make, functools.partial) or _spelling(make.func) is None:
            raise _Unrenderable(make)
        cls: Any = make.func
        fields = [f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
        given = dict(zip((f.name for f in fields), make.args, strict=False))
        given |= make.keywords
        parts, positional = [], True
        for f in fields:
            if f.name not in given:
                positional = False
                continue
            value = given[f.name]
            default = f.default if f.default is not dataclasses.MISSING else REQUIRED
            if default is not REQUIRED and f.name not in _KEEP and _same(value, default):
                positional = False
                continue
            positional = positional and default is REQUIRED
            text = self.value(value, [f.name, f"{label}_{f.name}"])
            parts.append(text if positional else f"{f.name}={text}")
        return f"{_spelling(cls)}({', '.join([*parts, self.place(path)])})"

    def _keywords(self, fn: Any, keywords: dict[str, Any], label: str) -> list[str]:
        """An op's keywords from its torch module, less those equal to its defaults."""
        try:
            defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
        except (TypeError, ValueError):
            defaults = {}
        return [
            f"{k}={self.value(v, [k, f'{label}_{k}'])}"
            for k, v in keywords.items()
            if k in _KEEP or k not in defaults or not _same(v, defaults[k])
        ]

    def child(self, child: _Child, inputs: list[str], outputs: list[int], names: list[str],
              group: int, holes: list[Any], calls: dict[str, int]) -> None:  # fmt: skip
        """Call a traced child: ``outputs`` are the indices of its nodes whose values it
        returns, ``names`` its own names for them."""
        start = len(self.holes)
        attribute = child.path.rpartition(".")[2]
        label = _identifier(attribute)
        for j, value in enumerate(holes):  # the child's literals are this body's too
            self.holes.append(value)
            self.names.append([f"\x01{group}:{j}:{label}"])
        constructor = f"\x01{group}:{start}\x01{self.place(child.path)})"
        constructor = self.once(child.path, label, constructor, calls)
        arguments = ", ".join([*(self.env[name] for name in inputs), "train=train"])
        if not attribute[:1].isalpha():
            label = _snake_name(child.torch_class.rpartition(".")[2])
        # (read outside the child: not only by its own nodes)
        inside = collections.Counter(ref_names([(n.args, n.kwargs) for n in child.nodes]))
        read = [
            any(
                self.reads[name] > inside[name]
                for name in (child.nodes[index].name, child.nodes[index].alias)
                if name is not None
            )
            for index in outputs
        ]
        if not any(read):  # (a check, or a value nothing reads)
            self.lines.append(f"{constructor}({arguments})")
            return
        # An output this call does not read is `_` (a module called in a loop returns what
        # any of its calls reads).
        targets = [
            self.local(label if len(outputs) == 1 else name) if used else "_"
            for name, used in zip(names, read, strict=True)
        ]
        self.lines.append(f"{', '.join(targets)} = {constructor}({arguments})")
        for index, target in zip(outputs, targets, strict=True):
            node = child.nodes[index]
            self.env[node.name] = target
            if node.alias is not None:
                self.env[node.alias] = target


def _same(a: Any, b: Any) -> bool:
    if _is_dtype(a) and _is_dtype(b):
        return jnp.dtype(a) == jnp.dtype(b)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # arrays, and the like
        return False


# --- the whole module -------------------------------------------------------------------


@dataclasses.dataclass
class _Group:
    """Instances of one torch class that compute the same: one generated class."""

    torch_class: str
    template: tuple[str, ...]  # 'both'|'train'|'eval'|'split', the body (or two)
    names: list[list[str]]
    attributes: tuple[str, ...]
    instances: list[list[Any]] = dataclasses.field(default_factory=list)
    root: bool = False
    paths: list[str] = dataclasses.field(default_factory=list)  # the instances' torch paths
    name: str = ""
    fields: dict[int, str] = dataclasses.field(default_factory=dict)  # hole -> field name
    order: list[str] = dataclasses.field(default_factory=list)  # field names, in order


@dataclasses.dataclass
class _Source:
    ported: PortedModule
    layers: dict[str, Any] = dataclasses.field(default_factory=dict)
    groups: list[_Group] = dataclasses.field(default_factory=list)
    tuples: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # (path, mode) -> the indices of a call's nodes it returns, and its names for them
    outputs: dict[tuple[str, bool], list[int]] = dataclasses.field(default_factory=dict)
    returned: dict[tuple[str, bool], list[str]] = dataclasses.field(default_factory=dict)

    def literal(self, value: Any) -> str:
        """``value`` as source; a torch model's own NamedTuple (GoogLeNet's outputs) is
        written as a NamedTuple of the generated module."""
        if (
            isinstance(value, type)
            and issubclass(value, tuple)
            and hasattr(value, "_fields")
            and _spelling(value) is None
        ):
            name, fields = _identifier(value.__name__), tuple(cast(Any, value)._fields)
            if self.tuples.setdefault(name, fields) != fields:
                raise _Unrenderable(value)
            return name
        return _literal(value)

    def generate(self) -> str:
        self.layers = dict(self.ported.layers)
        programs = {True: self.ported.train_program, False: self.ported.eval_program}
        flows = {mode: _Flow.of(p) for mode, p in programs.items()}
        # Every traced module's calls, per mode; each instance's depth and class.
        calls: dict[str, dict[bool, list[_Child]]] = {}
        depths: dict[str, int] = {}
        classes: dict[str, str] = {}

        def collect(nodes: list[Node], depth: int, mode: bool) -> None:
            for item in _split(nodes, depth):
                if isinstance(item, _Child):
                    calls.setdefault(item.path, {}).setdefault(mode, []).append(item)
                    depths[item.path], classes[item.path] = depth + 1, item.torch_class
                    collect(item.nodes, depth + 1, mode)

        for mode, program in programs.items():
            collect(list(program.nodes), 0, mode)
        placed: dict[str, tuple[int, list[Any]]] = {}  # path -> (group, its literals)
        for path in sorted(calls, key=lambda p: -depths[p]):  # children before parents
            runs = {mode: [run.nodes for run in found] for mode, found in calls[path].items()}
            rendered = self._render(path, depths[path], runs, flows, placed, None)
            placed[path] = self._place(classes[path], rendered, path)
        root_runs = {mode: [list(p.nodes)] for mode, p in programs.items()}
        rendered = self._render("", 0, root_runs, flows, placed, programs)
        root = self._place(self.ported.torch_class, rendered, "", root=True)[0]
        self._name_groups()
        return self._text(self.groups[root])

    def _render(self, path: str, depth: int, runs: dict[bool, list[list[Node]]],
                flows: dict[bool, _Flow], placed: Any,
                programs: dict[bool, Program] | None) -> dict[bool, _Rendered]:  # fmt: skip
        """Each mode's body of the module at ``path`` (the root's, given ``programs``)."""
        rendered: dict[bool, _Rendered] = {}
        for mode, mode_runs in runs.items():
            first = None
            outputs: list[int] = []
            if programs is None:  # (a module called in a loop returns what any call needs)
                outputs = sorted({i for run in mode_runs for i in flows[mode].boundary(run)[1]})
                self.outputs[path, mode] = outputs
            for nodes in mode_runs:
                body = _Body(self, path)
                if programs is not None:
                    program = programs[mode]
                    parameters = []
                    names = program.names or program.inputs
                    for node_name, name, default in zip(program.inputs, names,
                                                        program.defaults, strict=True):  # fmt: skip
                        body.env[node_name] = local = body.local(name, builtin=True)
                        parameters.append(
                            local if default is REQUIRED else f"{local}={_literal(default)}"
                        )
                else:
                    inputs = flows[mode].boundary(nodes)[0]
                    for i, name in enumerate(inputs):
                        body.env[name] = body.local("x" if i == 0 else f"x{i}")
                    parameters = [body.env[name] for name in inputs]
                read = ref_names([(n.args, n.kwargs) for n in nodes])
                if programs is not None:
                    returned = ref_names(programs[mode].output)
                else:
                    returned = [nodes[i].name for i in outputs]
                body.used = frozenset(read + returned)
                body.reads = collections.Counter(read + returned)
                self._fill(body, nodes, depth, mode, flows[mode], placed)
                if programs is not None:
                    body.lines.append(f"return {body.value(programs[mode].output)}")
                else:
                    returned = [body.env[nodes[i].name] for i in outputs]
                    self.returned[path, mode] = returned
                    body.lines.append(f"return {', '.join(returned)}" if outputs else "return None")
                signature = ", ".join(["self", *parameters, "train: bool = False"])
                text = "\n".join([f"def __call__({signature}):", *body.lines])
                current = _Rendered(text, body.holes, body.names, tuple(body.attributes))
                if first is None:
                    first = current
                elif first.key() != current.key():
                    raise _Unrenderable(f"{path} is called twice computing different things")
            assert first is not None
            rendered[mode] = first
        return rendered

    def _place(self, torch_class: str, rendered: dict[bool, _Rendered], path: str,
               root: bool = False) -> tuple[int, list[Any]]:  # fmt: skip
        """The group of an instance (a new one for a new computation), and its literals."""
        if len(rendered) == 2 and rendered[True].key() == rendered[False].key():
            kind, bodies = "both", [rendered[True]]
        else:
            kind = "split" if len(rendered) == 2 else ("train" if True in rendered else "eval")
            bodies = list(rendered.values())
        templates, holes, names = [], [], []
        for body in bodies:  # (the second body's holes numbered after the first's)
            offset = len(holes)
            shift = lambda m, o=offset: f"\x00{int(m.group(1)) + o}\x00"  # noqa: E731
            child = lambda m, o=offset: f"\x01{m.group(1)}:{int(m.group(2)) + o}\x01"  # noqa: E731
            templates.append(_CHILD.sub(child, _HOLE.sub(shift, body.text)))
            holes += body.holes
            names += body.names
        attributes = tuple(dict.fromkeys(a for body in bodies for a in body.attributes))
        template = (kind, *templates)
        if not root:
            for i, group in enumerate(self.groups):
                if group.torch_class == torch_class and group.template == template:
                    group.instances.append(holes)
                    group.paths.append(path)
                    return i, holes
        self.groups.append(_Group(torch_class, template, names, attributes, [holes], root, [path]))
        return len(self.groups) - 1, holes

    def _fill(self, body: _Body, nodes: list[Node], depth: int, mode: bool, flow: _Flow,
              placed: Any) -> None:  # fmt: skip
        items = _split(nodes, depth)
        here = len(body.path.split(".")) if body.path else 0
        body.read_at = frozenset(
            item.target[0][here]
            for item in items
            if isinstance(item, Node) and item.kind == "variable" and len(item.target[0]) > here
        )
        calls: dict[str, int] = {}
        for item in items:
            key = item.path if isinstance(item, _Child) else (
                item.target if item.kind == "layer" else "")  # fmt: skip
            calls[key] = calls.get(key, 0) + 1
        for item in items:
            if isinstance(item, _Child):
                inputs = flow.boundary(item.nodes)[0]
                group, holes = placed[item.path]
                outputs, names = self.outputs[item.path, mode], self.returned[item.path, mode]
                body.child(item, inputs, outputs, names, group, holes, calls)
            else:
                body.node(item, calls)

    def _name_groups(self) -> None:
        by_class: dict[str, list[_Group]] = {}
        for group in self.groups:
            if not group.root:
                by_class.setdefault(group.torch_class, []).append(group)
        taken = set(_RESERVED)
        for torch_class, groups in by_class.items():
            short = _identifier(torch_class.rpartition(".")[2])
            first = groups[0]
            for group in groups:
                name = short
                attribute = group.paths[0].rpartition(".")[2]
                extra = [a for a in group.attributes if a not in first.attributes]
                container = torch_class.startswith("torch.nn.modules.container.")
                if container and attribute[:1].isalpha():
                    name = _camel(attribute)  # (a Sequential is named for what it holds)
                elif (
                    group is not first and extra and set(first.attributes) <= set(group.attributes)
                ):
                    name = short + "With" + "".join(_camel(a) for a in extra)
                candidate, n = name, 2
                while candidate in taken:
                    candidate, n = f"{name}{n}", n + 1
                group.name = candidate
                taken.add(candidate)
        for group in self.groups:
            if group.root:
                name = _identifier(group.torch_class.rpartition(".")[2])
                while name in taken:
                    name += "Model"
                group.name = name
            else:
                self._fields(group)

    def _fields(self, group: _Group) -> None:
        """The literals that differ between a group's instances become its fields."""
        columns: dict[tuple[str, ...], str] = {}
        for hole in range(len(group.names)):
            values = tuple(_literal(instance[hole]) for instance in group.instances)
            if len(set(values)) == 1:
                continue
            if values in columns:
                group.fields[hole] = columns[values]
                continue
            candidates = [c for n in group.names[hole] for c in self._candidates(n)]
            name = next(
                (c for c in candidates if c and c not in group.order and c not in _RESERVED),
                f"field{hole}",
            )
            columns[values] = group.fields[hole] = name
            group.order.append(name)

    def _candidates(self, name: str) -> list[str]:
        """Field names for a hole: its own, or a child's field's (that field, then
        prefixed with the child's attribute)."""
        if not name.startswith("\x01"):
            return [name]
        group, hole, label = name[1:].split(":")
        field = self.groups[int(group)].fields.get(int(hole))
        return [] if field is None else [field, f"{label}_{field}" if label[0].isalpha() else ""]

    def _text(self, root: _Group) -> str:
        classes = [self._class(g) for g in self.groups if not g.root] + [self._class(root)]
        tuples = [
            f"class {name}(NamedTuple):\n" + "".join(f"    {f}: Any\n" for f in fields)
            for name, fields in self.tuples.items()
        ]
        code = "\n\n\n".join([*tuples, *classes])
        words = set(re.findall(r"\b(\w+)\.", code)) | set(re.findall(r"\b(Any)\b", code))
        typing = sorted({"Any"} & words | ({"NamedTuple"} if self.tuples else set()))
        standard = [_IMPORTS["functools"]] if "functools" in words else []
        standard += [f"from typing import {', '.join(typing)}"] if typing else []
        third = [_IMPORTS[n] for n in ("nn", "jnp", "np") if n in words or n == "nn"]
        ours = [_IMPORTS["jaxbn"]] if "jaxbn" in words else []
        port = [n for n in ("layers", "ops") if n in words]
        ours += [f"from jaxbn.port import {', '.join(port)}"] if port else []
        header = (
            f'"""{root.name}: {root.torch_class}, ported to Flax by jaxbn.\n\n'
            "Call it as the torch forward, on torch's layout ((N, C, H, W) images), plus\n"
            "``train``: True for a training step (pass ``mutable=['batch_stats']`` and a\n"
            "``'dropout'`` rng), False for eval. The variables are at the torch module\n"
            "paths, so ``jaxbn.to_torch`` loads them into the torch model. Yours to edit.\n"
            '"""\n\n'
        )
        head = "\n\n".join("\n".join(block) for block in (standard, third, ours) if block)
        return _format(f"{header}{head}\n\n\n{code}\n")

    def _class(self, group: _Group) -> str:
        fields = []
        for name in group.order:
            hole = next(h for h, n in group.fields.items() if n == name)
            fields.append(f"{name}: {_annotation([i[hole] for i in group.instances])}")
        kind, *templates = group.template
        texts = [self._resolve(t, group) for t in templates]
        if kind == "split":
            head, _, train_body = texts[0].partition("\n")
            eval_body = texts[1].partition("\n")[2]
            call = (
                f"{head}\n    if train:\n{_indent(train_body, 8)}\n    else:\n"
                f"{_indent(eval_body, 8)}"
            )
        else:
            head, _, body = texts[0].partition("\n")
            call = f"{head}\n{_indent(body, 4)}"
        lines = [f"class {group.name}(nn.Module):", f'    """{group.torch_class}."""', ""]
        if fields:
            lines += [f"    {f}" for f in fields] + [""]
        lines += ["    @nn.compact", _indent(call, 4)]
        return "\n".join(lines)

    def _resolve(self, template: str, group: _Group) -> str:
        """A template with each hole a literal or ``self.<field>``, and each child's
        constructor with its fields."""

        def hole(index: int) -> str:
            if index in group.fields:
                return f"self.{group.fields[index]}"
            return _literal(group.instances[0][index])

        def child(match: re.Match[str]) -> str:
            target = self.groups[int(match.group(1))]
            start = int(match.group(2))
            parts = []
            for name in target.order:
                h = next(h for h, n in target.fields.items() if n == name)
                parts.append(f"{name}={hole(start + h)}")
            return f"{target.name}({''.join(p + ', ' for p in parts)}"

        text = _CHILD.sub(child, template)
        return _HOLE.sub(lambda m: hole(int(m.group(1))), text)


@dataclasses.dataclass(frozen=True)
class _Rendered:
    """One mode's body of one call: template, its literals, their field names, children."""

    text: str
    holes: list[Any]
    names: list[list[str]]
    attributes: tuple[str, ...]

    def key(self) -> tuple[str, list[str]]:
        return self.text, [_literal(h) for h in self.holes]


def _snake_name(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _snake(layer: Any, default: str) -> str:
    """A local name for a leaf's output: its op's or class's name (``conv``, ``relu``)."""
    make = layer.make
    while isinstance(make, functools.partial):
        make = make.args[0] if make.func is Op and make.args else make.func
    name = getattr(make, "__name__", "")
    return _snake_name(name) if name else default


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in _identifier(name).split("_"))


def _indent(text: str, n: int) -> str:
    return "\n".join((" " * n + line) if line else line for line in text.split("\n"))


def _format(code: str) -> str:
    """The code as ``ruff format`` writes it, where ruff is installed."""
    command = _ruff()
    if command is None:
        return code
    done = subprocess.run(
        [*command, "format", "--isolated", "--stdin-filename", "model.py", "-"],
        input=code,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout if done.returncode == 0 else code


def _ruff() -> list[str] | None:
    """The ruff installed beside this Python (the port extra's), else one on PATH."""
    found = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent))
    found = found or shutil.which("ruff")
    return [found] if found is not None else None


def source(ported: PortedModule) -> str:
    """The Flax source of a ported module (see :meth:`jaxbn.port.Ported.source`)."""
    try:
        return _Source(ported).generate()
    except _Unrenderable as error:
        what = error.args[0] if error.args else error
        raise PortError(
            f"jaxbn.port: cannot write {ported.torch_class} as Flax source: {what!r} has no "
            "public spelling (a converter of your own, or a module read from another's "
            "forward); the ported module still runs, and ported.save() needs the source"
        ) from None
