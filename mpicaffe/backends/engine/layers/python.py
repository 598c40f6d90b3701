"""The Python layer: a layer written in Python with numpy, as Caffe's PythonLayer runs it.

`python_param { module layer param_str }` names a class; its object gets `param_str` and `phase`
and then, as in Caffe, `setup(bottom, top)` once when the net is built, `reshape(bottom, top)`
before every forward, `forward(bottom, top)` and `backward(top, propagate_down, bottom)`. Bottoms
and tops are blobs with numpy `.data`/`.diff`; the user's forward fills `top[i].data` and its
backward fills `bottom[i].diff` (and `self.blobs[j].diff`). Here the two calls form one autograd
node (`_UserLayerFunction`), so the rest of the net backpropagates through it as through any layer.

The module is imported as Caffe imports it (from sys.path, so PYTHONPATH), and also from the
prototxt's folder. Any class with these methods works: one deriving `mpicaffe.caffe.Layer`, one
written for real pycaffe (`class L(caffe.Layer)`, whose C++ base is never constructed here), or a
plain class.

Parameter blobs the user adds in `setup` (`self.blobs.add_blob(*shape)`) become this layer's blobs,
so the net packs them into its flat buffers, saves them in .caffemodel files and the solver
updates them; afterwards `self.blobs[j].data` is a view of the net's weights (a copy on a GPU).
All numpy arrays the user sees live on the CPU, as Caffe runs a PythonLayer's Forward_cpu even in
GPU mode.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Sequence

import torch

from mpicaffe.backends.engine.blob import Blob
from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base import Layer
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2


@register
class PythonLayer(Layer):
    """Caffe's Python layer: hosts the object of the class `python_param` names."""

    type = "Python"

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device, source: str = ""):
        super().__init__(param, phase, device, source)
        # Caffe's top blobs persist between forwards: the user's reshape may leave them as they are
        self._tops = [Blob() for _ in param.top]
        # the user's self.blobs[j].diff: CPU buffers, filled with the accumulated diff before backward
        self._param_diffs: list[torch.Tensor] = []
        self._set_up = False
        self._user_file: str | None = None
        self.user = self._create_user_object(self._load_class())

    # --- finding and building the user's object ---
    def _load_class(self) -> type:
        pp = self.param.python_param
        if not pp.module or not pp.layer:
            raise self.error("python_param needs `module` (a Python module on PYTHONPATH or in the prototxt's "
                             "folder) and `layer` (the name of a class in it)")
        folder = _prototxt_folder(self.source)
        # appended, so that sys.path (PYTHONPATH) wins as when Caffe imports the module
        if folder and folder not in sys.path:
            sys.path.append(folder)
        try:
            module = importlib.import_module(pp.module)
        except ModuleNotFoundError as e:
            if e.name is not None and (pp.module + ".").startswith(e.name + "."):
                where = f" or in the prototxt's folder {folder}" if folder else ""
                raise self.error(f"cannot find Python module '{pp.module}' on sys.path (PYTHONPATH){where}") from None
            raise self.error(f"importing Python module '{pp.module}' failed: {_describe(e)}") from e
        except Exception as e:
            raise self.error(f"importing Python module '{pp.module}' failed: {_describe(e)}") from e
        module_file = getattr(module, "__file__", None)
        self._user_file = os.path.abspath(module_file) if module_file else None
        cls = getattr(module, pp.layer, None)
        if not isinstance(cls, type):
            raise self.error(f"Python module '{pp.module}' ({module_file}) has no class "
                             f"'{pp.layer}'")
        return cls

    def _create_user_object(self, cls: type) -> object:
        # `_Hosted` comes first so that its `blobs` hides the read-only C++ property of real pycaffe's
        # Layer, whose C++ object (built from Caffe's own LayerParameter) cannot exist here
        hosted = type(cls.__name__, (_Hosted, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        obj = hosted.__new__(hosted)
        obj._mpicaffe_blobs = ParamBlobs(self)
        # Caffe builds the object as Class(layer_param); only an __init__ written in Python (the
        # user's, or mpicaffe.caffe.Layer's) can take our LayerParameter
        if inspect.isfunction(getattr(cls, "__init__", None)):
            self._call(obj, "__init__", self.param)
        return obj

    def _call(self, obj: object, method: str, *args):
        """Call a method of the user's object; an exception becomes a UserError naming this layer."""
        try:
            return getattr(obj, method)(*args)
        except Exception as e:
            cls = type(obj).__name__
            raise self.error(f"{self.param.python_param.module}.{cls}.{method} failed: "
                             f"{_describe(e, self._user_file)}") from e

    # --- the engine's Layer interface ---
    def setup(self, bottoms: list[torch.Tensor]) -> None:
        """Caffe's LayerSetUp: hand over param_str and phase, then call the user's setup."""
        self.user.param_str = self.param.python_param.param_str
        self.user.phase = self.param.phase
        self._call(self.user, "setup", _blobs_over(bottoms), self._tops)
        self._set_up = True

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Caffe's Reshape (after setup, and on Net.reshape): the tops as the user's reshape shapes them."""
        self._call(self.user, "reshape", _blobs_over(bottoms), self._tops)
        return self._top_tensors()

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self._tops:  # nothing to differentiate (a layer that only writes or prints)
            self.run_forward(bottoms)
            return []
        return list(_UserLayerFunction.apply(self, len(bottoms), *bottoms, *self.blobs))

    # --- what the autograd node calls ---
    def run_forward(self, bottoms: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Caffe's Layer::Forward: the user's reshape, then forward; returns copies of the tops."""
        bottom = _blobs_over(bottoms)
        self._call(self.user, "reshape", bottom, self._tops)
        self._call(self.user, "forward", bottom, self._tops)
        return self._top_tensors()

    def run_backward(self, bottoms: Sequence[torch.Tensor], tops: Sequence[torch.Tensor],
                     top_diffs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                     needs_grad: Sequence[bool]) -> list[torch.Tensor | None]:
        """The user's backward; returns the gradients of the bottoms, then of the parameter blobs."""
        propagate_down = list(needs_grad[:len(bottoms)])
        bottom = _blobs_over(bottoms)
        top = [Blob.over(t.detach().cpu(), d.detach().cpu()) for t, d in zip(tops, top_diffs)]
        # Caffe's param diffs accumulate over iter_size (and shared params) until the solver clears
        # them, and the user's code may assign or add to them: it sees the diff accumulated so far,
        # and autograd gets the change it made, so what autograd accumulates is what the user wrote
        before = []
        for j, p in enumerate(params):
            diff = self.param_diff(j)
            if p.grad is not None:
                diff.copy_(p.grad)
            else:
                diff.zero_()
            before.append(diff.clone())
        self._call(self.user, "backward", top, propagate_down, bottom)
        grads: list[torch.Tensor | None] = [
            b.diff_tensor.to(x.device, x.dtype) if pd else None for b, x, pd in zip(bottom, bottoms, propagate_down)]
        for j, (p, need) in enumerate(zip(params, needs_grad[len(bottoms):])):
            grads.append((self.param_diff(j) - before[j]).to(p.device, p.dtype) if need else None)
        return grads

    # --- parameter blobs, for ParamBlobs ---
    def add_user_blob(self, shape: tuple[int, ...]) -> None:
        if self._set_up:
            raise self.error("self.blobs.add_blob must be called in setup: the net packs the parameter blobs "
                             "when it is built")
        # on the CPU even for a GPU net, so that the user's initial values written into .data reach
        # the net, which copies its blobs into its (device) flat buffer after setup
        self.blobs.append(torch.zeros(shape, dtype=torch.float32))
        self.blob_learnable.append(True)

    def param_diff(self, j: int) -> torch.Tensor:
        """The CPU buffer behind the user's self.blobs[j].diff."""
        while len(self._param_diffs) <= j:
            self._param_diffs.append(torch.zeros(0))
        blob = self.blobs[j]
        if self._param_diffs[j].shape != blob.shape or self._param_diffs[j].dtype != blob.dtype:
            self._param_diffs[j] = torch.zeros(blob.shape, dtype=blob.dtype)
        return self._param_diffs[j]

    def _top_tensors(self) -> list[torch.Tensor]:
        # copies: the user's next forward writes into the same top blobs while autograd may still
        # hold this forward's tops
        return [t.tensor.to(self.device, copy=True) for t in self._tops]


class _UserLayerFunction(torch.autograd.Function):
    """The user's forward and backward as one autograd node: (bottoms, parameter blobs) -> tops."""

    @staticmethod
    def forward(ctx, layer: PythonLayer, n_bottoms: int, *inputs: torch.Tensor):
        tops = layer.run_forward(inputs[:n_bottoms])
        ctx.layer, ctx.n_bottoms = layer, n_bottoms
        # parameter blobs are leaves: kept for their accumulated .grad, not saved as values
        ctx.params = inputs[n_bottoms:]
        ctx.save_for_backward(*inputs[:n_bottoms], *tops)
        return tuple(tops)

    @staticmethod
    def backward(ctx, *top_diffs: torch.Tensor):
        saved = ctx.saved_tensors
        bottoms, tops = saved[:ctx.n_bottoms], saved[ctx.n_bottoms:]
        grads = ctx.layer.run_backward(bottoms, tops, top_diffs, ctx.params, ctx.needs_input_grad[2:])
        return (None, None, *grads)


class _Hosted:
    """Mixed in before the user's class: `self.blobs` as this engine keeps them."""

    @property
    def blobs(self) -> ParamBlobs:
        return self._mpicaffe_blobs


class ParamBlobs(Sequence):
    """A Python layer's parameter blobs as its code sees them (pycaffe's `self.blobs`)."""

    def __init__(self, layer: PythonLayer):
        self._layer = layer

    def add_blob(self, *shape: int) -> None:
        """Add a parameter blob of `shape`, zero-filled (in setup only); it is learned like any weight."""
        self._layer.add_user_blob(tuple(int(s) for s in shape))

    def __len__(self) -> int:
        return len(self._layer.blobs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"parameter blob index {index} out of range ({n} blobs)")
        return ParamBlob(self._layer, index % n)


class ParamBlob(Blob):
    """Parameter blob j of a Python layer: `.data` is the net's weight (looked up on each access,
    as the net replaces the tensor when it packs or shares it), `.diff` the user's diff buffer."""

    def __init__(self, layer: PythonLayer, index: int):
        self._layer = layer
        self._index = index
        self.grad_tensor = None
        self._diff = None

    @property
    def tensor(self) -> torch.Tensor:
        return self._layer.blobs[self._index]

    @tensor.setter
    def tensor(self, value: torch.Tensor) -> None:  # Blob.reshape
        if self._layer._set_up:
            raise UserError(f"layer '{self._layer.name}': a parameter blob can be reshaped in setup only")
        self._layer.blobs[self._index] = value

    @property
    def diff_tensor(self) -> torch.Tensor:
        return self._layer.param_diff(self._index)


def _blobs_over(tensors: Sequence[torch.Tensor]) -> list[Blob]:
    """Bottom blobs for the user: data on the CPU (the same memory on a CPU net); diffs are zeros
    made when first read."""
    blobs = []
    for t in tensors:
        blob = Blob()
        blob.tensor = t.detach().cpu()
        blobs.append(blob)
    return blobs


def _prototxt_folder(source: str) -> str | None:
    """The folder of the file the net came from: `source` is its path, or for a net written inside a
    solver "solver.prototxt (net_param)"; placeholders such as "<test>" name no file."""
    if not source or source.startswith("<"):
        return None
    folder = os.path.dirname(os.path.abspath(source))
    return folder if os.path.isdir(folder) else None


def _describe(e: BaseException, user_file: str | None = None) -> str:
    """`Type: message (file:line)`: the innermost line of the user's module in the traceback (where
    its code called into numpy, say), else the innermost line."""
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if user_file and os.path.abspath(f.filename) == user_file]
    frame = (own or frames or [None])[-1]
    where = f" ({frame.filename}:{frame.lineno})" if frame is not None else ""
    return f"{type(e).__name__}: {e}{where}"
