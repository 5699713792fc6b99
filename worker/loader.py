"""Building a served model: spec -> module, weights, device, precision, input checks.

A spec is ``NAME=package.module:factory[,key=value...]``; keys are ``weights`` (a
safetensors file), ``dtype`` (float32|float16|bfloat16), ``quantize`` (int8) and
``arg.NAME`` (a keyword argument for the factory). Weights are only ever read with
safetensors: never pickle, never torch.load.
"""
from __future__ import annotations

import importlib
import json
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BadInput(ValueError):
    """The request's inputs do not fit the model: answered BAD_REQUEST (a model may raise it too)."""


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


@dataclass
class ModelOptions:
    name: str
    spec: str
    weights: str | None = None
    dtype: str = "float32"
    quantize: str | None = None
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


def build_module(spec: str, kwargs: Mapping[str, Any] | None = None) -> torch.nn.Module:
    module_name, _, factory_name = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
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
                 wait_for_weights: bool = False):
        self.name, self.opts, self.device = opts.name, opts, device
        module = build_module(opts.spec, opts.kwargs)
        self.input_spec: dict | None = getattr(module, "input_spec", None)
        self.ready = not wait_for_weights  # not ready until the parameter servers give it weights
        if opts.weights:
            module.load_state_dict(load_file(opts.weights), strict=True)
        self.version = version if version is not None else (0 if opts.weights else None)
        self.module = self._prepare(module)
        self.lock = threading.Lock()  # held while running or swapping, so the two never mix

    def _prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        module.eval()
        if self.opts.quantize == "int8":
            if self.device.type != "cpu":
                raise ValueError("int8 dynamic quantization runs on CPU only")
            with warnings.catch_warnings():  # torch marks eager quantization deprecated; it still works
                warnings.simplefilter("ignore")
                return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
        return module.to(self.device, dtype=DTYPES[self.opts.dtype])

    @property
    def float_dtype(self) -> torch.dtype:
        return DTYPES[self.opts.dtype]

    def describe(self) -> dict:
        return {"version": self.version, "ready": self.ready, "dtype": self.opts.dtype,
                "quantize": self.opts.quantize, "device": str(self.device)}

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Raise BadInput naming what is wrong; return the number of rows (first dim)."""
        if self.input_spec is None:
            if not inputs:
                raise BadInput("no inputs given")
        else:
            want, got = set(self.input_spec), set(inputs)
            if want != got:
                raise BadInput(f"model {self.name!r} takes inputs {sorted(want)}, got {sorted(got)}"
                               + (f" (missing {sorted(want - got)})" if want - got else "")
                               + (f" (unexpected {sorted(got - want)})" if got - want else ""))
            for name, (shape, dtype) in self.input_spec.items():
                arr = inputs[name]
                if dtype and arr.dtype.name != dtype:
                    raise BadInput(f"input {name!r}: dtype {arr.dtype.name}, expected {dtype}")
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
        return rows.pop()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass on a (batched) set of inputs; outputs as float32/native numpy."""
        with self.lock, torch.inference_mode():
            tensors = {k: self._to_device(v) for k, v in inputs.items()}
            out = self.module(**tensors)
            return {k: _to_numpy(v) for k, v in _named_outputs(out).items()}

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        if t.is_floating_point() and self.opts.quantize is None:
            t = t.to(self.float_dtype)
        return t

    def swap(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Replace the weights between batches: the lock keeps any batch on one version."""
        staged = {k: v.to(self.device) for k, v in state.items()}  # copy to device before taking the lock
        module = build_module(self.opts.spec, self.opts.kwargs) if self.opts.quantize else None
        with self.lock:
            if module is not None:  # quantized modules are rebuilt from float weights
                module.load_state_dict(staged, strict=True)
                self.module = self._prepare(module)
            else:
                self.module.load_state_dict(staged, strict=True)
            self.version = version
            self.ready = True


def _named_outputs(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, Mapping):
        return dict(out)
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": t for i, t in enumerate(out)}
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, a dict or a tuple")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.float()  # float16/bfloat16 outputs travel as float32 (numpy has no bfloat16)
    return t.cpu().numpy()
