"""mpicaffe: train unmodified Caffe models data-parallel under mpirun."""

__version__ = "0.1.0"
