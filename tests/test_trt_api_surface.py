"""The TensorRT adapter against TensorRT's real Python API surface (tensorrt-stubs 10.13).

TensorRT cannot be installed here, so the adapter (engines/trt_apply.py, trt_runner.py,
trt_builder.py) is otherwise only exercised against the recording stub of
test_trt_plan.py, which we wrote ourselves and which would happily accept a misspelt
method. This test reads the `tensorrt-stubs` package (type stubs generated from
TensorRT 10.13's bindings) and checks that every module attribute, class, method,
attribute and enum member the adapter uses, and every flag any build plan can name,
exists there.

Reading the stubs: the generated .pyi does not parse as a whole (e.g. a signature with
a non-default argument after a default one), so each top-level block is parsed on its
own and a `def` line that does not parse is replaced by a bare `def name(self, *a, **k)`.

Finding what the adapter uses: a small, flow-insensitive type inference over the adapter's
source. The tensorrt module is whatever `import_tensorrt()` / `import tensorrt` returns;
`trt.C(...)` is an instance of class C; `x.m(...)` on an instance of T has the return
annotation of T.m in the stubs; `x.a` the annotation of attribute a; `_enum(trt, "E", m)`
is a member m of enum E (its members come from the build plans). Every attribute read on
a typed receiver is a use. Receivers the inference cannot type are listed, and must be in
UNTYPED_OK, so a new call on an untyped TensorRT object cannot slip through unchecked.

The stubs install with `pip install --no-deps --target .venv/tensorrt-stubs tensorrt-stubs==10.13.0.35.1`
(Makefile): the wheel depends on the real TensorRT bindings, which do not install here,
and its stub-only `tensorrt/` folder would import as an empty namespace package if it
were on sys.path.
"""

from __future__ import annotations

import ast
import importlib.metadata
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import cunet_optimize.engines.trt_apply as trt_apply_module
import cunet_optimize.engines.trt_builder as trt_builder_module
import cunet_optimize.engines.trt_runner as trt_runner_module
from cunet_optimize.targets import PRECISIONS, TARGETS
from cunet_optimize.engines.trt_plan import HARDWARE_COMPAT_LEVELS, TRT_MAJORS, make_build_plan
from cunet_optimize.errors import CUNetError

REPO = Path(__file__).resolve().parent.parent
STUBS_VERSION = "10.13"
STUBS_ENV = "CUNET_TRT_STUBS"  # set by `make test`: then missing stubs fail instead of skipping
ADAPTER_MODULES = (trt_apply_module, trt_runner_module, trt_builder_module)

# Names a build plan may use that TensorRT 10.x does not have: they must be absent from
# the 10.13 stubs (if NVIDIA backports one, move it out of here) and only TensorRT 11
# plans may name them. Source: TensorRT 11.4.1 release notes (DLA restored on AGX Orin).
TRT11_ONLY = {("OnnxParserFlag", "ADJUST_FOR_DLA")}

# Receivers of attribute reads that are not TensorRT objects (or are polygraphy's CUDA
# wrappers, whose API is polygraphy's, checked by test_polygraphy.py), by source text.
UNTYPED_OK = {
    "batch", "buf", "bundle / 'trt_plan.json'", "bundle_onnx", "cache_path", "content", "cuda", "d_in", "form",
    "getattr(self, '_buffers', {})", "host_in", "json", "log", "logging", "notes", "np", "onnx_path", "options", "os",
    "os.path", "out", "plan", "self", "self._buffers", "self._buffers[last]", "self._cuda",
    "self._device_buffer(name, shape, dtype)", "self._stream", "self.engine_path", "shutil", "super()", "sys",
    "out / copy", "(out / copy).parent",  # the engine's copies for a Triton repository (trt_builder._place_copies)
}


# --------------------------------------------------------------------------------------
# Reading the stubs


@dataclass
class StubClass:
    name: str
    bases: list[str]
    members: dict[str, str | None] = field(default_factory=dict)  # name -> annotation / return type text


@dataclass
class StubSurface:
    root: Path
    module: set[str]  # names of the tensorrt module
    classes: dict[str, StubClass]
    skipped_lines: list[str]

    def member(self, cls: str, name: str) -> tuple[bool, str | None]:
        """(exists, annotation) of cls.name, following base classes and nested classes."""
        seen = set()
        todo = [cls]
        while todo:
            current = todo.pop(0)
            if current in seen or current not in self.classes:
                continue
            seen.add(current)
            entry = self.classes[current]
            if name in entry.members:
                return True, entry.members[name]
            todo += entry.bases
        return False, None


def _parse_block(text: str, skipped: list[str]) -> ast.Module:
    lines = text.split("\n")
    for _ in range(50):
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError as err:
            index = (err.lineno or 1) - 1
            bad = lines[index]
            skipped.append(bad.strip())
            m = re.match(r"^(\s*)def (\w+)\(.*\)\s*(->\s*(.+))?:\s*$", bad)
            if m:
                ret = f" -> {m.group(4)}" if m.group(4) else ""
                lines[index] = f"{m.group(1)}def {m.group(2)}(self, *args, **kwargs){ret}:"
                try:  # the return annotation itself may be what does not parse
                    ast.parse(lines[index].strip() + " ...")
                except SyntaxError:
                    lines[index] = f"{m.group(1)}def {m.group(2)}(self, *args, **kwargs):"
            else:
                lines[index] = re.match(r"^\s*", bad).group(0) + "..."
    raise AssertionError("stub block does not parse even line by line")


def _top_level_blocks(text: str) -> list[str]:
    """The file split before each unindented line that starts a statement."""
    blocks, current = [], []
    for line in text.split("\n"):
        if line[:1] not in ("", " ", "\t", "#", ")", "]", "}") and current and not _inside_string(current):
            blocks.append("\n".join(current))
            current = []
        current.append(line)
    blocks.append("\n".join(current))
    return blocks


def _inside_string(lines: list[str]) -> bool:
    return sum(line.count('"""') for line in lines) % 2 == 1


def _annotation(node: ast.AST | None) -> str | None:
    if node is None:
        return None
    text = ast.unparse(node)
    m = re.fullmatch(r"(?:typing\.)?ClassVar\[(.+)\]", text)
    return m.group(1) if m else text


def _collect_class(node: ast.ClassDef, prefix: str, classes: dict[str, StubClass]) -> None:
    name = prefix + node.name
    entry = classes.setdefault(name, StubClass(name, [ast.unparse(b) for b in node.bases]))
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            is_property = any(ast.unparse(d) == "property" for d in item.decorator_list)
            returns = _annotation(item.returns)
            # a property reads as its return type; a method as a callable returning it
            entry.members.setdefault(item.name, returns if is_property else f"() -> {returns}")
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            entry.members[item.target.id] = _annotation(item.annotation)
        elif isinstance(item, ast.Assign):
            for target in item.targets:
                if isinstance(target, ast.Name):
                    entry.members[target.id] = None
        elif isinstance(item, ast.ClassDef):
            entry.members[item.name] = f"type[{name}.{item.name}]"
            _collect_class(item, name + ".", classes)


def read_stubs(root: Path) -> StubSurface:
    classes: dict[str, StubClass] = {}
    skipped: list[str] = []
    module: set[str] = set()
    for rel in ("tensorrt_bindings/tensorrt.pyi", "tensorrt/__init__.pyi"):
        for block in _top_level_blocks((root / rel).read_text()):
            for node in _parse_block(block, skipped).body:
                if isinstance(node, ast.ClassDef):
                    _collect_class(node, "", classes)
                    module.add(node.name)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    module.add(node.name)
                elif isinstance(node, ast.ImportFrom):
                    module.update(a.asname or a.name for a in node.names)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    module.add(node.target.id)
    return StubSurface(root, module, classes, skipped)


def stubs_root() -> Path | None:
    """Where tensorrt-stubs is: $CUNET_TRT_STUBS, the Makefile's .venv/tensorrt-stubs, or an
    ordinary installation."""
    candidates = []
    if os.environ.get(STUBS_ENV):
        candidates.append(Path(os.environ[STUBS_ENV]))
    candidates.append(REPO / ".venv" / "tensorrt-stubs")
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
        candidates.append(Path(dist.locate_file("")))
    except importlib.metadata.PackageNotFoundError:
        pass
    for root in candidates:
        if (root / "tensorrt_bindings" / "tensorrt.pyi").is_file():
            return root
    return None


@pytest.fixture(scope="module")
def stubs() -> StubSurface:
    root = stubs_root()
    if root is None:
        message = (f"tensorrt-stubs {STUBS_VERSION} not found (pip install --no-deps --target "
                   f".venv/tensorrt-stubs tensorrt-stubs=={STUBS_VERSION}.*)")
        if os.environ.get(STUBS_ENV):
            pytest.fail(f"{STUBS_ENV}={os.environ[STUBS_ENV]}: {message}")
        pytest.skip(message)
    surface = read_stubs(root)
    version = re.search(r"__version__: str = '([\d.]+)'", (root / "tensorrt" / "__init__.pyi").read_text())
    assert version and version.group(1).startswith(STUBS_VERSION + "."), version
    return surface


# --------------------------------------------------------------------------------------
# What the adapter uses


MODULE = "<tensorrt module>"
# Parameters of adapter functions that receive TensorRT objects (engine_dtype(trt, engine, name)).
PARAMETER_TYPES = {"trt": MODULE, "engine": "ICudaEngine"}


@dataclass
class Use:
    owner: str  # MODULE or a stub class name
    name: str
    where: str  # file:line

    def __str__(self) -> str:
        owner = "tensorrt" if self.owner == MODULE else self.owner
        return f"{owner}.{self.name} ({self.where})"


class AdapterUses(ast.NodeVisitor):
    """Attribute reads on the tensorrt module and on the objects it returns (see module doc)."""

    def __init__(self, surface: StubSurface, enum_members: dict[str, set[str]], filename: str):
        self.surface = surface
        self.enum_members = enum_members
        self.filename = filename
        self.env: dict[str, str] = {}  # source text of a name / self.attr -> type
        self.uses: list[Use] = []
        self.untyped: set[str] = set()

    # -- typing of expressions ------------------------------------------------------

    def type_of(self, node: ast.AST) -> str | None:
        text = ast.unparse(node)
        if text in self.env:
            return self.env[text]
        if isinstance(node, ast.IfExp):
            return self.type_of(node.body) or self.type_of(node.orelse)
        if isinstance(node, ast.Call):
            func = node.func
            fname = ast.unparse(func)
            if fname == "import_tensorrt":
                return MODULE
            if fname == "_enum" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                return node.args[1].value
            if fname == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                return self._attribute_type(node.args[0], node.args[1].value, node)
            callee = self.type_of(func)
            if callee and callee.startswith("type["):
                return callee[5:-1]
            if callee and callee.startswith("() -> "):
                return _strip(callee[6:])
            return None
        if isinstance(node, ast.Attribute):
            return self._attribute_type(node.value, node.attr, node)
        return None

    def _attribute_type(self, receiver: ast.AST, attr: str, node: ast.AST) -> str | None:
        owner = self.type_of(receiver)
        if owner is None:
            return None
        if owner == MODULE:
            if attr in self.surface.classes:
                return f"type[{attr}]"
            if attr == "nptype":
                return "() -> None"
            return None
        exists, annotation = self.surface.member(owner, attr)
        if not exists:
            return None
        if annotation and annotation.startswith("type["):
            return annotation
        if annotation is None or annotation.startswith("() -> "):
            return annotation
        return _strip(annotation)

    # -- recording -------------------------------------------------------------------

    def record(self, owner: str, name: str, node: ast.AST) -> None:
        self.uses.append(Use(owner, name, f"{self.filename}:{node.lineno}"))

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for arg in node.args.args:
            if arg.arg in PARAMETER_TYPES:
                self.env[arg.arg] = PARAMETER_TYPES[arg.arg]
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "tensorrt":
                self.env[alias.asname or "tensorrt"] = MODULE

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                for t, v in zip(target.elts, node.value.elts):
                    self._bind(t, v)
            else:
                self._bind(target, node.value)
            self.visit(target)

    def _bind(self, target: ast.AST, value: ast.AST) -> None:
        kind = self.type_of(value)
        if kind is not None:
            self.env[ast.unparse(target)] = kind

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.visit(node.value)
        owner = self.type_of(node.value)
        if owner is None:
            if not isinstance(node.ctx, ast.Store):
                self.untyped.add(ast.unparse(node.value))
            return
        if owner.startswith("type["):
            owner = owner[5:-1]
        if owner.startswith("() -> "):
            return
        self.record(owner, node.attr, node)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        fname = ast.unparse(node.func)
        if fname == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            owner = self.type_of(node.args[0])
            if owner is not None:
                self.record(owner, node.args[1].value, node)
        if fname == "_enum" and len(node.args) >= 3 and isinstance(node.args[1], ast.Constant):
            enum = node.args[1].value
            self.record(MODULE, enum, node)
            member = node.args[2]
            names = {member.value} if isinstance(member, ast.Constant) else self.enum_members.get(enum)
            assert names is not None, f"{self.filename}:{node.lineno}: no plan names members of {enum}"
            for name in sorted(names):
                self.record(enum, name, node)


def _strip(annotation: str) -> str:
    """'IHostMemory | None' -> 'IHostMemory'; 'tensorrt.X' -> 'X'."""
    text = annotation.split("|")[0].strip().strip("'\"")
    return text.removeprefix("tensorrt_bindings.tensorrt.").removeprefix("tensorrt.")


def all_plans():
    """Every plan the registry can produce: target x precision x TensorRT major x DLA core x
    the options that add flags (typing, fallback, portability)."""
    for spec in TARGETS.values():
        if spec.backend != "tensorrt":
            continue
        cores = [None, *range(spec.dla_cores)]
        for precision, major, core, typed, fallback, version_compat, hw in itertools.product(
            PRECISIONS, TRT_MAJORS, cores, (None, True, False), (True, False), (False, True),
            (None, *HARDWARE_COMPAT_LEVELS),
        ):
            try:
                yield make_build_plan(spec.name, precision, "model.onnx", major, dla_core=core, strongly_typed=typed,
                                      gpu_fallback=fallback, version_compat=version_compat, hardware_compat=hw)
            except CUNetError:
                continue


def plan_enum_members(plans) -> dict[str, dict[str, set[int]]]:
    """{enum: {member: TensorRT majors of the plans that name it}}."""
    named: dict[str, dict[str, set[int]]] = {}
    for plan in plans:
        for enum, names in (("NetworkDefinitionCreationFlag", plan.network_flags),
                            ("BuilderFlag", plan.builder_flags), ("OnnxParserFlag", plan.parser_flags),
                            ("HardwareCompatibilityLevel",
                             [HARDWARE_COMPAT_LEVELS[plan.hardware_compat]] if plan.hardware_compat else [])):
            for name in names:
                named.setdefault(enum, {}).setdefault(name, set()).add(plan.trt_major)
    return named


def adapter_uses(surface: StubSurface, enum_members: dict[str, set[str]], sources=None) -> tuple[list[Use], set[str]]:
    uses, untyped = [], set()
    for module in ADAPTER_MODULES:
        path = Path(module.__file__)
        text = (sources or {}).get(path.name, path.read_text())
        visitor = AdapterUses(surface, enum_members, path.name)
        visitor.visit(ast.parse(text))
        uses += visitor.uses
        untyped |= visitor.untyped
    return uses, untyped


def missing(surface: StubSurface, uses: list[Use]) -> list[str]:
    out = []
    for use in uses:
        if use.owner == MODULE:
            ok = use.name in surface.module
        else:
            ok = surface.member(use.owner, use.name)[0]
        if not ok and (use.owner, use.name) not in TRT11_ONLY:
            out.append(str(use))
    return sorted(set(out))


@pytest.fixture(scope="module")
def plans():
    return list(all_plans())


@pytest.fixture(scope="module")
def named(plans):
    return plan_enum_members(plans)


# --------------------------------------------------------------------------------------
# The checks


def test_stubs_are_read_whole_despite_their_syntax_errors(stubs):
    # the generated signatures that do not parse (e.g. tensorrt.pyi lines 4748, 5723) are
    # skipped one line each, not the class around them
    assert 1 <= len(stubs.skipped_lines) < 20, stubs.skipped_lines
    assert any(line.startswith("def add_scale_nd(") for line in stubs.skipped_lines)
    assert stubs.member("INetworkDefinition", "add_scale_nd")[0]
    assert stubs.member("INetworkDefinition", "add_convolution_nd")[0]  # after the bad line
    assert len(stubs.classes) > 150
    assert stubs.member("IBuilderConfig", "set_memory_pool_limit") == (True, "() -> None")
    assert stubs.member("Builder", "create_builder_config") == (True, "() -> IBuilderConfig")
    assert stubs.member("Builder", "num_DLA_cores") == (True, "int")
    assert stubs.member("Logger", "WARNING")[0]  # inherited from ILogger
    assert not stubs.member("IBuilderConfig", "set_memory_pool_limt")[0]


def test_every_name_the_adapter_uses_exists_in_tensorrt_10_13(stubs, named):
    uses, untyped = adapter_uses(stubs, {e: set(m) for e, m in named.items()})
    assert missing(stubs, uses) == []
    # the inference reached every TensorRT object the adapter touches
    seen = {(u.owner, u.name) for u in uses}
    for expected in [
        (MODULE, "Logger"), ("Logger", "WARNING"), (MODULE, "Builder"), ("Builder", "create_network"),
        (MODULE, "OnnxParser"), ("OnnxParser", "set_flag"), ("OnnxParser", "parse_from_file"),
        ("OnnxParser", "num_errors"), ("OnnxParser", "get_error"), ("Builder", "create_builder_config"),
        ("IBuilderConfig", "set_flag"), ("IBuilderConfig", "set_memory_pool_limit"), ("MemoryPoolType", "WORKSPACE"),
        ("Builder", "create_optimization_profile"), ("IOptimizationProfile", "set_shape"),
        ("IBuilderConfig", "add_optimization_profile"), ("IBuilderConfig", "create_timing_cache"),
        ("IBuilderConfig", "set_timing_cache"), ("Builder", "num_DLA_cores"), ("IBuilderConfig", "default_device_type"),
        ("DeviceType", "DLA"), ("IBuilderConfig", "DLA_core"), ("IBuilderConfig", "hardware_compatibility_level"),
        ("HardwareCompatibilityLevel", "AMPERE_PLUS"), ("Builder", "build_serialized_network"),
        ("IBuilderConfig", "get_timing_cache"), ("ITimingCache", "serialize"), (MODULE, "__version__"),
        (MODULE, "Runtime"), ("Runtime", "deserialize_cuda_engine"), ("ICudaEngine", "create_execution_context"),
        ("ICudaEngine", "get_tensor_name"), ("ICudaEngine", "num_io_tensors"), ("ICudaEngine", "get_tensor_mode"),
        ("TensorIOMode", "INPUT"), ("TensorIOMode", "OUTPUT"), ("ICudaEngine", "get_tensor_shape"),
        ("ICudaEngine", "get_tensor_dtype"), (MODULE, "nptype"), ("IExecutionContext", "set_input_shape"),
        ("IExecutionContext", "set_tensor_address"), ("IExecutionContext", "get_tensor_shape"),
        ("IExecutionContext", "execute_async_v3"), ("BuilderFlag", "INT8"), ("BuilderFlag", "GPU_FALLBACK"),
        ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"), ("OnnxParserFlag", "ADJUST_FOR_DLA"),
    ]:
        assert expected in seen, expected
    # anything the inference could not type is known not to be a TensorRT object
    assert untyped <= UNTYPED_OK, sorted(untyped - UNTYPED_OK)


def test_every_flag_a_plan_can_name_exists_or_is_marked_tensorrt_11_only(stubs, plans, named):
    assert len(plans) > 500
    for enum, members in named.items():
        for name, majors in members.items():
            if (enum, name) in TRT11_ONLY:
                assert not stubs.member(enum, name)[0], f"{enum}.{name} is in TensorRT 10.13: drop it from TRT11_ONLY"
                assert majors == {11}, f"{enum}.{name} is TensorRT-11-only but TensorRT {sorted(majors)} plans name it"
            else:
                assert stubs.member(enum, name)[0], f"{enum}.{name} (TensorRT {sorted(majors)} plans) is not in 10.13"
    # the precision flags TensorRT 11 removed are named by TensorRT 10 plans only
    for name in ("INT8", "FP16", "FP8", "BF16", "INT4"):
        assert 11 not in named["BuilderFlag"].get(name, set()), name


@pytest.mark.parametrize("original, misspelt, culprit", [
    ("config.set_memory_pool_limit(", "config.set_memory_pool_limt(", "IBuilderConfig.set_memory_pool_limt"),
    ("ctx.execute_async_v3(", "ctx.execute_async_v2(", "IExecutionContext.execute_async_v2"),
    ('"MemoryPoolType", "WORKSPACE"', '"MemoryPoolType", "WORKSPACE_SIZE"', "MemoryPoolType.WORKSPACE_SIZE"),
    ("trt.TensorIOMode.INPUT", "trt.TensorIOMode.IN", "TensorIOMode.IN"),
    ('getattr(builder, "num_DLA_cores", 0)', 'getattr(builder, "num_dla_cores", 0)', "Builder.num_dla_cores"),
    ("serialized = builder.build_serialized_network(", "serialized = builder.build_engine(", "Builder.build_engine"),
])
def test_a_misspelt_name_in_the_adapter_is_caught(stubs, named, original, misspelt, culprit):
    sources = {}
    for module in ADAPTER_MODULES:
        path = Path(module.__file__)
        text = path.read_text()
        if original in text:
            sources[path.name] = text.replace(original, misspelt)
    assert sources, f"{original!r} is no longer in the adapter: update this test"
    uses, _ = adapter_uses(stubs, {e: set(m) for e, m in named.items()}, sources)
    assert any(m.startswith(culprit + " ") for m in missing(stubs, uses)), missing(stubs, uses)


def test_a_plan_flag_tensorrt_lacks_is_caught(stubs, named):
    with_typo = {e: {n: set(m) for n, m in members.items()} for e, members in named.items()}
    with_typo["BuilderFlag"]["GPU_FALLBACKS"] = {10}
    assert not stubs.member("BuilderFlag", "GPU_FALLBACKS")[0]
    uses, _ = adapter_uses(stubs, {e: set(m) for e, m in with_typo.items()})
    assert "BuilderFlag.GPU_FALLBACKS" in " ".join(missing(stubs, uses))


def test_a_stub_only_tensorrt_package_is_not_taken_for_tensorrt(monkeypatch):
    import sys
    import types

    from cunet_optimize.engines.trt_apply import TensorRTUnavailable, import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what the stubs' folder imports as
    with pytest.raises(TensorRTUnavailable, match="without its bindings"):
        import_tensorrt()
