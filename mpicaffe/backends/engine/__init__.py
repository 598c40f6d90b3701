"""The built-in Caffe engine: Caffe's nets, layers, fillers and solvers on PyTorch.

Forward passes are Caffe's formulas in torch ops; backward passes come from autograd, so each
layer states its forward once. Learnable parameters live in one flat buffer per net (and their
diffs in another), which the solvers update and the communicator reduces without per-parameter
Python work.
"""
