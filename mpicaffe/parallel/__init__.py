"""Everything that talks MPI, and the only package that imports mpi4py: the communicator
(`comm`), gradient averaging (`reducer`), the stall watch (`stall`) and in-run recovery from rank
failures with ULFM (`recovery`)."""
