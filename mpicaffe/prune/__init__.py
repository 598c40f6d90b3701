"""Pruning: criteria, dependency-aware surgery on (prototxt, weights, solver state), reports, and
apoptosis during training. `mpicaffe prune` is mpicaffe.prune.command; see each module's docstring."""
