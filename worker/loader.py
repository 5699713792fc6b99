"""Building a served model: spec -> module, weights, device, precision, input checks.

A spec is ``NAME=package.module:factory[,key=value...]``; keys are ``weights`` (a
safetensors file), ``dtype`` (float32|float16|bfloat16), ``quantize`` (int8) and
``arg.NAME`` (a keyword argument for the factory), ``version`` (the version a weights file is served
as, default 0), ``keep`` (versions kept loaded side by side, default 1), ``max_batch`` (rows per
batch for this model, overriding the worker's --max-batch-size; 1: never batched) and ``ignore_keys``
(GLOB|GLOB: checkpoint keys the module does not hold, dropped and reported; docs/models.md), ``strip_prefix``
and ``add_prefix`` (rename checkpoint keys the module does not hold: a sentence-transformers export's
``0.auto_model.``, a task model's ``bert.``, a wrapper's ``encoder.``) and ``cache`` (true: the model
is deterministic, so the master may answer repeated inputs from its response cache). Weights are only ever read with
safetensors: never pickle, never torch.load.

``preprocess=module:function`` and ``postprocess=module:function`` name stage factories, loaded
like the model's factory and called once per model *version* (``build_stages``), with the
``arg.NAME`` options their signature takes (and ``version``, if it names it); each returns the
stage (worker/stages.py runs them per request). A version's stages are built with its module,
off to the side (``build_shadow``), and swapped in with it: a stage factory that fails refuses
the version like weights that do not fit, and the old version keeps serving with its own stages.

The module may declare ``input_spec`` (checked on every request; its variable-length inputs,
if any, make the model's batching ragged: worker/batching.py) and ``max_batch_size`` (a cap on
its rows per batch; 1 when it must never be batched).

Weights are all-or-nothing: a candidate state dict is checked whole against the module's
layout (`check_state`, a pure function), then a complete new module is built off to the side
(`build_shadow`, on the weight-sync thread: the live module's structure taking the new
tensors as its own, converted to the served dtype/device where they differ; int8 rebuilt), and
the compute thread only swaps one reference (`install`). The live module is never written to; a
delta's module shares the live one's unchanged tensors and unchanged plain submodules, read-only.
"""
from __future__ import annotations

import collections
import copy
import fnmatch
import functools
import importlib
import inspect
import json
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import structlog
import torch
from safetensors.torch import load_file

from ringserve.protocol.codec import wire_dtype
from ringserve.worker.batching import ModelBatching, ragged_from_spec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_REPORTED_KEYS = 20  # ignored checkpoint keys listed in the heartbeat (all are logged by count)

log = structlog.get_logger("ringserve.worker.loader")


class BadInput(ValueError):
    """The request's inputs do not fit the model: answered BAD_REQUEST (a model or a stage may raise
    it too: ``from ringserve.worker.loader import BadInput``)."""


class TooLong(BadInput):
    """A variable-length input beyond the model's max_len (the input's fault even after a preprocess stage)."""


# Substrings of torch's messages for shape errors: raised while running on a request's input, they
# mean the input does not fit the model (the request was checked against input_spec already).
_SHAPE_ERRORS = ("size of tensor", "sizes of tensors", "must match the size", "shapes cannot be multiplied",
                 "shape '", "invalid for input of size", "dimension", "expected input", "expected size",
                 "but got", "out of range", "out of bounds")


def input_error(exc: BaseException) -> str | None:
    """A clear line if `exc`, raised by a model on one request's input, was caused by that input."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, BadInput):
        return str(exc)
    if isinstance(exc, IndexError):
        return ("input out of range for this model (a token id beyond the vocabulary, or a sequence "
                f"longer than the model takes?): {first}")
    if isinstance(exc, RuntimeError) and any(k in first.lower() for k in _SHAPE_ERRORS):
        return f"inputs do not fit the model (lengths or shapes disagree?): {first}"
    return None


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` on `ref`'s device (and in its dtype, for floating tensors): `t` itself when it already is."""
    dtype = ref.dtype if t.is_floating_point() and ref.is_floating_point() else t.dtype
    return t.to(device=ref.device, dtype=dtype)


_SHARED_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


_NOT_PLAIN = object()


def _plain_copy(value: object, depth: int = 0) -> object:
    """A copy of plain data (numbers, strings, dtypes, devices and sizes shared as immutable;
    dicts, lists, sets and tuples of those copied), equal to what deepcopy makes of it;
    _NOT_PLAIN for anything else (a function, a tensor, an object), or nested deeper than 8."""
    if type(value) in _SHARED_TYPES:
        return value
    if depth >= 8:
        return _NOT_PLAIN
    if isinstance(value, dict) and type(value) in (dict, collections.OrderedDict):
        out = type(value)()
        for k, v in value.items():
            k2, v2 = _plain_copy(k, depth + 1), _plain_copy(v, depth + 1)
            if k2 is _NOT_PLAIN or v2 is _NOT_PLAIN:
                return _NOT_PLAIN
            out[k2] = v2
        return out
    if type(value) in (list, tuple, set, frozenset):
        items = [_plain_copy(v, depth + 1) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else type(value)(items)
    return _NOT_PLAIN


@functools.lru_cache(maxsize=1024)
def _clonable_class(cls: type) -> bool:
    """Whether modules of `cls` may be cloned attribute by attribute (`_clone_structure`): not
    scripted, and the class neither copies nor pickles itself its own way."""
    return not (issubclass(cls, torch.jit.ScriptModule) or getattr(cls, "__deepcopy__", None) is not None
                or cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__getstate__ is not torch.nn.Module.__getstate__
                or cls.__setstate__ is not torch.nn.Module.__setstate__ or "__slots__" in cls.__dict__)


def _unchanged(module: torch.nn.Module, tensors: Mapping[int, torch.Tensor],
               seen: dict[int, bool]) -> bool:
    """Whether every parameter and buffer of `module` and of all its submodules is mapped to
    itself in `tensors` (none of them changes), every class in it passes `_clonable_class` and
    every other attribute is plain data, as `_clone_structure` would copy it (so it refers to no
    other module or tensor, which may change); `seen`: the answer per submodule, filled in."""
    if id(module) in seen:
        return seen[id(module)]
    ok = _clonable_class(type(module))
    for name, value in module.__dict__.items():
        if not ok:
            break
        if name == "_parameters" or name == "_buffers":
            ok = all(t is None or tensors.get(id(t)) is t for t in value.values())
        elif name != "_modules":
            kind = type(value)
            # _plain_copy's answer, without a copy for the common cases (a flag, an empty hook dict)
            ok = (kind in _SHARED_TYPES or (kind in (collections.OrderedDict, dict, set) and not value)
                  or _plain_copy(value) is not _NOT_PLAIN)
    for sub in module._modules.values():  # each one answered, shared where it can be
        if sub is not None and not _unchanged(sub, tensors, seen):
            ok = False
    seen[id(module)] = ok
    return ok


def _clone_structure(module: torch.nn.Module, tensors: Mapping[int, torch.Tensor],
                     done: dict[int, torch.nn.Module] | None = None,
                     unchanged: dict[int, bool] | None = None) -> torch.nn.Module | None:
    """A copy of `module`'s structure whose parameters and buffers are `tensors[id(live tensor)]`,
    made without copy.deepcopy's generic walk (~10 ms for a 100-layer stack, most of a delta's build
    here): each submodule a new object of its class with its own attribute dict and its own
    _parameters/_buffers/_modules dicts, its other attributes copied as plain data. Only for plain
    modules: None (the caller deep-copies) when an attribute is not plain data (a tensor outside
    the state dict, a function, an object: a hook is set), or the class copies or pickles itself
    its own way.

    A submodule none of whose tensors changes (each is mapped to itself, `_unchanged`) is not
    copied at all: the new structure holds that very submodule, shared read-only with the live
    module, as its tensors are (a served module is never written to). So a delta of one layer
    copies only the modules on the way from the top to that layer (3 of a 100-layer stack's 102)."""
    done = {} if done is None else done
    if id(module) in done:  # one submodule used twice stays one
        return done[id(module)]
    cls = type(module)
    if not _clonable_class(cls):
        return None
    if unchanged is None:
        unchanged = {}
        _unchanged(module, tensors, unchanged)
    attrs: dict[str, Any] = {}
    for name, value in module.__dict__.items():
        if name in ("_parameters", "_buffers"):
            if any(t is not None and id(t) not in tensors for t in value.values()):
                return None
            attrs[name] = type(value)((k, None if t is None else tensors[id(t)]) for k, t in value.items())
        elif name == "_modules":
            subs = type(value)()
            for k, sub in value.items():
                subs[k] = None if sub is None else sub if unchanged.get(id(sub)) else _clone_structure(
                    sub, tensors, done, unchanged)
                if sub is not None and subs[k] is None:
                    return None
            attrs[name] = subs
        else:  # the (empty) hook dicts, flags, sizes, an input_spec: copied; a hook or an object: deep copy
            attrs[name] = _plain_copy(value)
            if attrs[name] is _NOT_PLAIN:
                return None
    new = cls.__new__(cls)
    new.__dict__.update(attrs)
    done[id(module)] = new
    return new


def _has_load_hooks(module: torch.nn.Module) -> bool:
    """Whether any submodule takes part in loading a state dict itself (load hooks, its own
    _load_from_state_dict): such a module is built through load_state_dict, which runs them."""
    base = torch.nn.Module._load_from_state_dict
    return any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks
               or type(m)._load_from_state_dict is not base for m in module.modules())


class WeightsRefused(ValueError):
    """A candidate state dict does not fit the module (keys, shapes or dtypes)."""


class StageBuildError(RuntimeError):
    """A stage factory failed for a version: that version is refused (at start-up: the worker stops)."""


@dataclass(frozen=True)
class Stages:
    """One version's stages, built for `version` (None: before any weights came) and kept beside its
    module, so a request is tokenized, computed and pooled by one version (worker/stages.py)."""

    version: int | None
    pre: Callable | None
    post: Callable | None


class ModelLoadError(RuntimeError):
    """A model cannot be built or loaded at start-up: one line saying which model and why."""


def drop_ignored(state: Mapping[str, Any], layout: Mapping[str, Any], patterns: Sequence[str]
                 ) -> tuple[dict[str, Any], list[str]]:
    """Drop checkpoint keys the module does not hold that match one of `patterns` (fnmatch globs),
    e.g. BERT's non-persistent `embeddings.position_ids`; return (kept, sorted ignored keys).
    Keys the module does hold are never dropped, and unmatched extras still fail `check_state`."""
    if not patterns:
        return dict(state), []
    ignored = sorted(k for k in state if k not in layout and any(fnmatch.fnmatchcase(k, p) for p in patterns))
    return {k: v for k, v in state.items() if k not in set(ignored)}, ignored


def rename_keys(state: Mapping[str, Any], layout: Mapping[str, Any], strip: str = "", add: str = ""
                ) -> dict[str, Any]:
    """A checkpoint key the module does not hold loses the prefix `strip` (when it has it) and gains
    `add`; keys the module holds are kept as they are, so the module's own state dict still loads.
    Two keys renamed to one name are refused (WeightsRefused), never silently merged."""
    if not strip and not add:
        return dict(state)
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = key if key in layout else add + (key[len(strip):] if strip and key.startswith(strip) else key)
        if new in out:
            raise WeightsRefused(f"strip_prefix={strip!r}, add_prefix={add!r} give two checkpoint keys the name {new!r}")
        out[new] = value
    return out


Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def layout_of(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a state dict for `module` must hold: name -> (shape, dtype)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def check_state(layout: Layout, state: Mapping[str, Any]) -> None:
    """Raise WeightsRefused naming every key that is missing, extra, or of the wrong shape or dtype.

    Floating-point weights may arrive in another floating dtype (the worker converts them to
    its served dtype anyway); integer and bool tensors must match exactly."""
    problems = []
    missing, extra = sorted(set(layout) - set(state)), sorted(set(state) - set(layout))
    if missing:
        problems.append(f"missing {_few(missing)}")
    if extra:
        problems.append(f"unexpected {_few(extra)}")
    for name in sorted(set(layout) & set(state)):
        shape, dtype = layout[name]
        t = state[name]
        got_shape, got_dtype = tuple(t.shape), t.dtype
        if got_shape != shape:
            problems.append(f"{name}: shape {list(got_shape)}, expected {list(shape)}")
        elif got_dtype != dtype and not (got_dtype.is_floating_point and dtype.is_floating_point):
            problems.append(f"{name}: dtype {str(got_dtype).removeprefix('torch.')}, "
                            f"expected {str(dtype).removeprefix('torch.')}")
    if problems:
        raise WeightsRefused("; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))


def _few(names: list[str]) -> str:
    return str(names[:5])[:-1] + (f", ... {len(names) - 5} more]" if len(names) > 5 else "]")


@dataclass
class ModelOptions:
    name: str
    spec: str
    weights: str | None = None
    dtype: str = "float32"
    quantize: str | None = None
    version: int = 0  # the version a file's weights are served as (shards give their own)
    keep: int = 1  # versions kept loaded side by side (current + keep-1 earlier), for canary and A/B splits
    ignore_keys: tuple[str, ...] = ()  # checkpoint keys (globs) the module does not hold, dropped on load
    strip_prefix: str = ""  # removed from checkpoint keys the module does not hold (before add_prefix)
    add_prefix: str = ""  # then put in front of them (the wrapper's attribute, e.g. "encoder.")
    max_batch: int | None = None  # rows per batch for this model (None: the worker's --max-batch-size)
    cache: bool = False  # deterministic: the master may answer repeated inputs from its response cache
    preprocess: str | None = None  # module:function, a stage factory (worker/stages.py)
    postprocess: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_model_arg(text: str, defaults: Mapping[str, Any] | None = None) -> ModelOptions:
    """'mlp=ringserve.worker.demo:mlp,dtype=float16,arg.hidden=512' -> ModelOptions."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"model must look like NAME=module:factory[,key=value...], got {text!r}")
    spec, *pairs = rest.split(",")
    opts = ModelOptions(name=name, spec=spec, **dict(defaults or {}))
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key.startswith("arg."):
            opts.kwargs[key[4:]] = _literal(value)
        elif key in ("weights", "dtype", "quantize"):
            setattr(opts, key, value or None)
        elif key in ("preprocess", "postprocess"):
            if not _is_target(value):
                raise ValueError(f"{key} must look like module:function, got {value!r}")
            setattr(opts, key, value)
        elif key == "version":
            if not value.isdigit():
                raise ValueError(f"version must be a non-negative integer, got {value!r}")
            opts.version = int(value)
        elif key == "ignore_keys":
            opts.ignore_keys = tuple(p for p in value.split("|") if p)
        elif key in ("strip_prefix", "add_prefix"):
            if not value:
                raise ValueError(f"{key} needs a prefix, e.g. {key}=0.auto_model.")
            setattr(opts, key, value)
        elif key == "keep":
            if not value.isdigit() or not 1 <= int(value) <= 16:
                raise ValueError(f"keep must be an integer in 1..16, got {value!r}")
            opts.keep = int(value)
        elif key == "cache":
            if value not in ("true", "false"):
                raise ValueError(f"cache must be true or false, got {value!r}")
            opts.cache = value == "true"
        elif key == "max_batch":
            if not value.isdigit() or not 1 <= int(value) <= 65536:
                raise ValueError(f"max_batch must be an integer in 1..65536, got {value!r}")
            opts.max_batch = int(value)
        else:
            raise ValueError(f"unknown model option {key!r} in {text!r}")
    if opts.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {opts.dtype!r}")
    if opts.quantize not in (None, "int8"):
        raise ValueError(f"quantize must be int8, got {opts.quantize!r}")
    return opts


def _literal(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _is_target(value: str) -> bool:
    module_name, sep, name = value.partition(":")
    return bool(sep and module_name and name)


def load_target(spec: str) -> Any:
    """`module:name` -> the object (the one loading rule for factories and stage factories)."""
    module_name, _, factory_name = spec.partition(":")
    return getattr(importlib.import_module(module_name), factory_name)


def build_stage(spec: str, kwargs: Mapping[str, Any] | None = None, version: int | None = None) -> Callable:
    """Call a stage factory with the model options its signature takes (all with **kwargs), and
    `version` (the weights version the stage will serve with) when its signature names it; it must
    return the stage, a callable (a tokenizer's state lives in it)."""
    factory = load_target(spec)
    kwargs = dict(kwargs or {})
    try:
        params = inspect.signature(factory).parameters.values()
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            kwargs = {k: v for k, v in kwargs.items() if k in names}
        if "version" in names:
            kwargs["version"] = version
    except (TypeError, ValueError):  # no signature to read (a builtin): pass everything
        pass
    stage = factory(**kwargs)
    if not callable(stage):
        raise TypeError(f"{spec} returned {type(stage).__name__}, not a callable (the stage)")
    return stage


def build_module(spec: str, kwargs: Mapping[str, Any] | None = None) -> torch.nn.Module:
    factory = load_target(spec)
    model = factory(**dict(kwargs or {}))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def pick_device(requested: str | None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ServedModel:
    """One model as a worker serves it. Only the compute thread runs or swaps it."""

    def __init__(self, opts: ModelOptions, device: torch.device, version: int | None = None,
                 wait_for_weights: bool = False, on_demand: bool = False):
        self.name, self.opts, self.device = opts.name, opts, device
        self.ignored_keys: list[str] = []  # checkpoint keys dropped by ignore_keys (listed in status)
        t0 = time.monotonic()
        log.info("model_building", model=opts.name, spec=opts.spec, device=str(device))
        try:
            module = build_module(opts.spec, opts.kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's factory is reported in one line
            raise ModelLoadError(f"model {opts.name!r}: cannot build {opts.spec}: {type(exc).__name__}: {exc}") from exc
        self.input_spec: dict | None = getattr(module, "input_spec", None)
        cap = getattr(module, "max_batch_size", None)
        try:
            self.ragged = ragged_from_spec(self.input_spec)  # variable-length inputs: how they pad
            if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
                raise ValueError(f"max_batch_size must be a positive integer, got {cap!r}")
        except ValueError as exc:
            raise ModelLoadError(f"model {opts.name!r}: {opts.spec}: {exc}") from exc
        self.batching = ModelBatching(max_batch=opts.max_batch, cap=cap, ragged=self.ragged)
        self.layout = layout_of(module)  # before dtype/int8: what published weights must look like
        self.ready = not wait_for_weights  # not ready until the parameter servers give it weights
        if opts.weights:
            try:
                state = self._fit(load_file(opts.weights))
                module.load_state_dict(state, strict=True)
            except Exception as exc:  # noqa: BLE001 - a missing file, a bad file, keys that do not fit
                hint = " (keys the module does not hold can be dropped with ignore_keys=GLOB, a prefix they carry " \
                       "renamed with strip_prefix=/add_prefix=; see docs/models.md)" \
                    if isinstance(exc, WeightsRefused) and "unexpected" in str(exc) else ""
                raise ModelLoadError(f"model {opts.name!r}: cannot load {opts.weights}: "
                                     f"{type(exc).__name__}: {exc}{hint}") from exc
        # A model that serves without the shards (weights from a file or from its factory) is version
        # opts.version (0 unless version=N); one waiting for the shards has none yet.
        self.version = version if version is not None else (None if wait_for_weights or on_demand else opts.version)
        # Stages, built per version: these for the version at start-up (None while waiting for weights),
        # so a stage factory that fails stops the worker in one line.
        self.older_stages: dict[int, Stages] = {}  # beside `older`: each kept version's own stages
        self._shadow_stages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # built module -> its stages
        # built module -> {name: (the tensor `state` gave for it, the module's own tensor)}: the next
        # build keeps the module's own tensor (and a submodule whose tensors all stay) where `state`
        # gives the very same tensor object again (_with_tensors)
        self._built_from: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._shadow_lock = threading.Lock()
        try:
            self.stages: Stages | None = self.build_stages(self.version)
        except StageBuildError as exc:
            raise ModelLoadError(f"model {opts.name!r}: {exc}") from exc
        # On demand (--max-models): nothing is held until the first request asks for the model.
        self.on_demand = on_demand
        self.module = None if on_demand else self._prepare(module)
        self.ready = self.ready and not on_demand
        self.loading = False  # the weight-sync thread is fetching it (on demand)
        self.last_used = 0.0  # monotonic time of the last batch: the LRU order
        self.loads = self.evictions = 0
        self.older: dict[int, torch.nn.Module] = {}  # earlier versions kept loaded, oldest first (keep - 1 of them)
        self.refused: dict | None = None  # {"version", "reason"}: the last version this worker could not load
        self.lock = threading.Lock()  # held while running or swapping, so the two never mix
        log.info("model_built", model=opts.name, seconds=round(time.monotonic() - t0, 3), weights=opts.weights,
                 ready=self.ready, waiting_for="first request" if on_demand else
                 "parameter servers" if wait_for_weights else None)

    def _prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        module.eval()
        if self.opts.quantize == "int8":
            if self.device.type != "cpu":
                raise ValueError(f"int8 dynamic quantization runs on CPU only, and this worker's device is {self.device}: "
                                 "start a worker with --device cpu for this model")
            with warnings.catch_warnings():  # torch marks eager quantization deprecated; it still works
                warnings.simplefilter("ignore")
                return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
        return module.to(self.device, dtype=DTYPES[self.opts.dtype])

    @property
    def float_dtype(self) -> torch.dtype:
        return DTYPES[self.opts.dtype]

    @property
    def has_stages(self) -> bool:
        return bool(self.opts.preprocess or self.opts.postprocess)

    @property
    def preprocess(self) -> Callable | None:
        """The current version's preprocess stage (None: the model has none)."""
        stages = self.stages
        return stages.pre if stages is not None else None

    @property
    def postprocess(self) -> Callable | None:
        stages = self.stages
        return stages.post if stages is not None else None

    def stages_for(self, version: int | None) -> Stages | None:
        """The stages of `version` when it is held (None, or a version not held: the current ones)."""
        stages = self.stages
        if version is None or stages is None or stages.version == version:
            return stages
        return self.older_stages.get(version, stages)

    def build_stages(self, version: int | None) -> Stages | None:
        """Both stage factories called for `version` (None when the model has no stages); raises
        StageBuildError naming the stage and the version."""
        if not self.has_stages:
            return None
        built: dict[str, Callable | None] = {}
        for what in ("preprocess", "postprocess"):
            target = getattr(self.opts, what)
            try:
                built[what] = None if target is None else build_stage(target, self.opts.kwargs, version)
            except Exception as exc:  # noqa: BLE001 - any failure of the user's stage factory, in one line
                where = "" if version is None else f" for version {version}"
                raise StageBuildError(f"cannot build {what} {target}{where}: {type(exc).__name__}: {exc}") from exc
        return Stages(version, built["preprocess"], built["postprocess"])

    def describe(self) -> dict:
        info = {"version": self.version, "ready": self.ready, "dtype": self.opts.dtype,
                "quantize": self.opts.quantize, "device": str(self.device)}
        if self.older:
            info["versions"] = self.versions()  # every version a request may pin here
        if self.on_demand:
            info["on_demand"] = True
        if self.opts.cache:
            info["cache"] = True  # deterministic: the master may answer repeated inputs from its cache
        inputs = announced_inputs(self.input_spec)
        if inputs:
            info["inputs"] = inputs  # what a gateway lists as the model's metadata
        if self.ignored_keys:
            info["ignored_keys"] = self.ignored_keys[:MAX_REPORTED_KEYS]  # not loaded (ready false) still means: send it, it loads
        refused = self.refused
        if refused is not None:
            info["refused"] = dict(refused)
        return info

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Raise BadInput naming what is wrong; return the number of rows (first dim). With a
        preprocess stage these are the request's own inputs (checked against the stage's
        ``input_spec`` attribute, if it has one); ``check_model_inputs`` checks what it returns."""
        if self.preprocess is not None:
            return self._check(inputs, getattr(self.preprocess, "input_spec", None), None)
        return self._check(inputs, self.input_spec, self.ragged)

    def check_model_inputs(self, inputs: Mapping[str, np.ndarray]) -> int:
        """What the module takes (its input_spec, ragged lengths): a preprocess stage's result."""
        return self._check(inputs, self.input_spec, self.ragged)

    def _check(self, inputs: Mapping[str, np.ndarray], spec: Mapping | None, ragged) -> int:
        if spec is None:
            if not inputs:
                raise BadInput("no inputs given")
        else:
            want, got = set(spec), set(inputs)
            optional = {ragged.mask} if ragged is not None and ragged.mask else set()
            if not want - optional <= got <= want:
                raise BadInput(f"model {self.name!r} takes inputs {sorted(want)}, got {sorted(got)}"
                               + (f" (missing {sorted(want - got)})" if want - got else "")
                               + (f" (unexpected {sorted(got - want)})" if got - want else ""))
            for name, (shape, dtype, *_) in spec.items():
                if name not in inputs:
                    continue  # an optional attention mask: the worker builds it
                arr = inputs[name]
                if dtype and wire_dtype(arr) != dtype:
                    raise BadInput(f"input {name!r}: dtype {wire_dtype(arr)}, expected {dtype}")
                if shape is not None and (len(arr.shape) != len(shape) or any(
                        s is not None and s != a for s, a in zip(shape, arr.shape))):
                    pretty = ["N" if s is None else s for s in shape]
                    raise BadInput(f"input {name!r}: shape {list(arr.shape)}, expected {pretty}")
        for name, arr in inputs.items():  # batching concatenates along dim 0: it must exist and hold rows
            if arr.ndim == 0:
                raise BadInput(f"input {name!r} is a scalar; inputs need a first (batch) dimension")
            if arr.shape[0] == 0:
                raise BadInput(f"input {name!r} has zero rows (shape {list(arr.shape)})")
            if arr.size == 0:
                raise BadInput(f"input {name!r} is empty (shape {list(arr.shape)}): an empty sequence?")
        rows = {arr.shape[0] for arr in inputs.values()}
        if len(rows) != 1:
            raise BadInput(f"inputs disagree on the number of rows: {sorted(rows)}")
        if ragged is not None:
            self._check_lengths(inputs)
        return rows.pop()

    def _check_lengths(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Variable-length inputs: a sequence axis (dim 1), one length per request, at most max_len."""
        lengths = {}
        for name in self.ragged.pads:
            if name in inputs:
                if inputs[name].ndim < 2:
                    raise BadInput(f"input {name!r}: shape {list(inputs[name].shape)}, expected [rows, length, ...]")
                lengths[name] = inputs[name].shape[1]
        if len(set(lengths.values())) > 1:
            raise BadInput(f"inputs disagree on the sequence length (dim 1): {lengths}")
        length = next(iter(lengths.values()))
        if self.ragged.max_len is not None and length > self.ragged.max_len:
            raise TooLong(f"sequence length {length} (dim 1 of {sorted(lengths)}) is beyond this model's "
                          f"maximum {self.ragged.max_len}")

    def holds(self, version: int | None) -> bool:
        """Whether a batch for `version` (None: the current one) can run here."""
        return version is None or version == self.version or version in self.older

    def versions(self) -> list[int]:
        return sorted({*self.older, *([self.version] if self.version is not None else [])})

    def run(self, inputs: Mapping[str, np.ndarray], version: int | None = None) -> dict[str, np.ndarray]:
        """One forward pass on a (batched) set of inputs, by the current module or, for a pinned
        earlier `version` still held, by that one; outputs as float32/native numpy."""
        with self.lock, torch.inference_mode():
            self.last_used = time.monotonic()
            module = self.module if version is None or version == self.version else self.older[version]
            tensors = {k: self._to_device(v) for k, v in inputs.items()}
            out = module(**tensors)
            return {k: _to_numpy(v) for k, v in _named_outputs(out).items()}

    def _to_device(self, arr: np.ndarray) -> torch.Tensor | np.ndarray:
        if arr.dtype.kind == "O":  # a bytes tensor: the module takes the numpy object array as it is
            return arr
        t = torch.from_numpy(arr)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        if t.is_floating_point() and self.opts.quantize is None and t.dtype is not self.float_dtype:
            t = t.to(self.float_dtype)  # (to() of the dtype it has returns the tensor: the call alone skipped)
        return t

    def build_shadow(self, state: Mapping[str, torch.Tensor], version: int | None = None) -> torch.nn.Module:
        """A complete new module with `state`, ready to serve (dtype, int8, device), and the stages
        for `version` (kept for `install` to swap in with it): built off to the side, on the caller's
        thread (weight sync), so the compute thread only swaps a reference. Raises WeightsRefused or
        StageBuildError (and touches nothing live) when `state` does not fit the module or a stage
        factory fails for `version`.

        Without int8, the new module is a copy of the live one's structure whose tensors are
        `state`'s own (converted to the served dtype and device only where they differ): no
        copy of the weights at all on CPU in the served dtype. The caller must never write to
        `state`'s tensors afterwards (weight sync never does: a new version gets new arrays)."""
        state = self._fit(state)
        module = self._with_tensors(state) if self.opts.quantize is None else None
        if module is None:
            module = self._copy_live() if self.opts.quantize is None else None
            if module is not None:  # a copy of the live module (in dtype, on device): copy_ converts and moves
                module.load_state_dict(state, strict=True)
            else:  # quantized modules (or ones that cannot be copied) are rebuilt from float weights
                module = build_module(self.opts.spec, self.opts.kwargs)
                module.load_state_dict(state, strict=True)  # into the fresh module only
                module = self._prepare(module)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copy is done before anyone can run it
        stages = self.build_stages(version)
        if stages is not None:
            with self._shadow_lock:
                self._shadow_stages[module] = stages
        return module

    def _fit(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Rename prefixed keys, drop the ignored ones (logged and reported), then check the rest
        whole against the module."""
        state = rename_keys(state, self.layout, self.opts.strip_prefix, self.opts.add_prefix)
        state, ignored = drop_ignored(state, self.layout, self.opts.ignore_keys)
        if ignored and ignored != self.ignored_keys:
            log.info("checkpoint_keys_ignored", model=self.name, keys=ignored[:20], count=len(ignored))
            self.ignored_keys = ignored
        check_state(self.layout, state)
        return state

    def _with_tensors(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module | None:
        """A copy of the live module's structure whose state tensors are `state`'s own
        (converted only where the served dtype or device differs): each live tensor is mapped
        straight to its replacement (a plain module is cloned attribute by attribute,
        `_clone_structure`; any other goes through deepcopy with the mapping as its memo), so
        nothing is copied and no second pass
        assigns them (`_assign_copy`, the load_state_dict(assign=True) route, is kept for modules
        with load hooks of their own). None when there is no live module, one tensor serves under
        two names (tied weights: assigning would untie them), or anything here fails (the caller
        then copies into a full copy, as before)."""
        if self.module is None:
            return None
        try:
            built_from = self._built_from.get(self.module)
            # the live module's state as checked when it was built here (a served module is never written to)
            live = ({k: t for k, (_, t) in built_from.items()} if built_from is not None
                    else self.module.state_dict(keep_vars=True))
            if len({id(t) for t in live.values()}) != len(live) or not all(isinstance(t, torch.Tensor)
                                                                             for t in live.values()):
                return None
            # (a module built here was cloned from one without load hooks, its hook dicts copied: it has none)
            if set(state) != set(live) or (built_from is None and _has_load_hooks(self.module)):
                return self._assign_copy(state, live)
            memo, new = {}, {}
            built_from = built_from or {}
            for k, t in live.items():
                was = built_from.get(k)
                if was is not None and was[0] is state[k] and was[1] is t:
                    new[k] = memo[id(t)] = t  # the tensor the live one was built from: the live one, shared
                    continue
                v = _like(state[k], t)
                new[k] = v = torch.nn.Parameter(v, requires_grad=t.requires_grad) if isinstance(
                    t, torch.nn.Parameter) else v
                memo[id(t)] = v
            module = _clone_structure(self.module, memo)  # plain modules: no deepcopy walk
            if module is None:
                module = copy.deepcopy(self.module, memo)
            got = module.state_dict(keep_vars=True)
            if set(got) != set(new) or any(got[k] is not v for k, v in new.items()):
                return self._assign_copy(state, live)  # a module that keeps its state some other way
            self._built_from[module] = {k: (state[k], v) for k, v in new.items()}
            return module
        except Exception as exc:  # noqa: BLE001 - fall back to copying into a full copy
            log.warning("assign_build_failed_copying", model=self.name, error=f"{type(exc).__name__}: {exc}")
            return None

    def _assign_copy(self, state: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> torch.nn.Module | None:
        """The live module's structure copied with placeholders on the meta device (no memory,
        nothing copied), then `state` put in with load_state_dict(assign=True) (its hooks run)."""
        memo = {id(t): (torch.nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
                        if isinstance(t, torch.nn.Parameter) else torch.empty_like(t, device="meta"))
                for t in live.values()}
        module = copy.deepcopy(self.module, memo)
        module.load_state_dict({k: _like(v, live[k]) for k, v in state.items()}, strict=True, assign=True)
        if any(t.is_meta for t in module.state_dict().values()):
            return None
        return module

    def _copy_live(self) -> torch.nn.Module | None:
        """A deep copy of the live module (only read, never written): about half the cost of the
        factory's random init. None if the module cannot be copied."""
        try:
            return copy.deepcopy(self.module)
        except Exception:  # noqa: BLE001 - fall back to the factory
            return None

    def install(self, module: torch.nn.Module, version: int) -> None:
        """Swap in a module built by `build_shadow`, and its version's stages, between batches: the
        lock keeps any batch on one version."""
        with self._shadow_lock:
            stages = self._shadow_stages.pop(module, None)
        if self.has_stages and (stages is None or stages.version != version):
            stages = self.build_stages(version)  # built without its version (a caller other than weight sync)
        with self.lock:
            older_stages = dict(self.older_stages)
            if self.opts.keep > 1 and self.ready and self.version is not None and self.version != version:
                self.older[self.version] = self.module  # kept loaded for requests pinned to it
                if self.stages is not None:
                    older_stages[self.version] = self.stages
            self.older.pop(version, None)
            while len(self.older) > self.opts.keep - 1:
                self.older.pop(next(iter(self.older)))  # the one kept longest goes first
            self.older_stages = {v: st for v, st in older_stages.items() if v in self.older}  # one assignment
            self.stages = stages
            if self.on_demand and not self.ready:
                self.loads += 1
            self.module = module
            self.version = version
            self.ready = True
            self.loading = False
        refused = self.refused
        if refused is not None and version >= refused["version"]:
            self.refused = None  # that version or a newer one serves now (a rollback: see note_current)

    def unload(self) -> None:
        """Drop every held version (LRU eviction of an on-demand model); the next request loads it again."""
        with self.lock:
            self.module, self.older, self.version, self.ready = None, {}, None, False
            self.older_stages = {}  # `stages` stay: requests that come meanwhile are tokenized, then re-staged
            self.evictions += 1

    def note_current(self, version: int) -> None:
        """The shards agree `version` is current: a refusal of another version is over (a rollback
        or a newer publish replaced it), so status stops reporting it."""
        refused = self.refused
        if refused is not None and refused["version"] != version:
            self.refused = None

    def refuse(self, version: int, reason: str) -> None:
        """Remember (and report in heartbeats) a version this worker cannot load; it keeps serving the old one."""
        self.refused = {"version": version, "reason": reason[:500]}
        self.loading = False


def announced_inputs(spec: Any) -> list:
    """input_spec -> [[name, dtype, shape with -1 for any size (None: any rank)]], for status and the
    gateway's model metadata; [] when the module declares none (or declares something odd)."""
    if not isinstance(spec, dict):
        return []
    out = []
    for name, entry in list(spec.items())[:64]:
        try:
            shape, dtype = entry[0], entry[1]
            dims = None if shape is None else [-1 if d is None else int(d) for d in shape]
        except (TypeError, ValueError, IndexError):
            return []
        if not isinstance(name, str) or not isinstance(dtype, str):
            return []
        out.append([name, dtype, dims])
    return out


def _named_outputs(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, Mapping):
        return dict(out)
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": t for i, t in enumerate(out)}
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, a dict or a tuple")


def _to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, np.ndarray):  # e.g. a bytes output (an object array of bytes or str)
        return t
    t = t.detach()
    if t.is_floating_point() and t.dtype is not torch.float32 and t.dtype is not torch.float64:
        t = t.float()  # float16/bfloat16 outputs travel as float32 (numpy has no bfloat16)
    return (t if t.is_cpu else t.cpu()).numpy()
