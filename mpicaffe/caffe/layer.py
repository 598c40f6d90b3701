"""pycaffe's `caffe.Layer`: the base class of a layer written in Python (`type: "Python"`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpicaffe.backends.engine.blob import Blob
    from mpicaffe.backends.engine.layers.python import ParamBlobs
    from mpicaffe.proto import caffe_pb2


class Layer:
    """A Caffe layer written in Python, run by a net's `type: "Python"` layer.

    The net names the class in `python_param { module: "my_layers" layer: "MyLayer" }` and builds
    one object per layer. Before `setup` it sets `self.param_str` (python_param's param_str) and
    `self.phase` (caffe.TRAIN or caffe.TEST). `self.blobs` holds the layer's parameter blobs:
    `self.blobs.add_blob(*shape)` in `setup` adds one, which is saved in .caffemodel files and
    learned by the solver (lr_mult/decay_mult from the layer's `param { }` entries).

    Bottoms and tops are lists of blobs with numpy `.data` and `.diff`, `.reshape(*shape)`,
    `.shape`, `.count` and `.num`/`.channels`/`.height`/`.width`. Override:

    - `setup(bottom, top)`: once, when the net is built (read param_str, check bottoms, add blobs);
    - `reshape(bottom, top)`: before every forward: `top[i].reshape(...)`;
    - `forward(bottom, top)`: write `top[i].data[...]`;
    - `backward(top, propagate_down, bottom)`: where `propagate_down[i]`, write `bottom[i].diff[...]`
      from `top[k].diff`; write (or add to) `self.blobs[j].diff[...]` for parameter gradients.

    A layer with no bottoms is a data layer (its forward runs every iteration); a top with a
    `loss_weight` makes it a loss layer. Under `mpicaffe train`, `caffe.solver_rank()` and
    `caffe.solver_count()` give its MPI rank and the number of ranks.
    """

    type = "Python"
    param_str: str
    phase: int
    blobs: ParamBlobs

    def __init__(self, param: caffe_pb2.LayerParameter | None = None):
        # Caffe constructs the layer as Class(layer_param); what the layer needs comes in setup
        pass

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        """Once, when the net is built."""

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        """Before every forward: give the tops their shapes."""

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define forward(bottom, top)")

    def backward(self, top: list[Blob], propagate_down: list[bool], bottom: list[Blob]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define backward(top, propagate_down, bottom) "
                                  "to be trained through")
