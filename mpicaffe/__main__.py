"""`python -m mpicaffe` runs the command-line interface."""
import sys

from mpicaffe.cli import main

sys.exit(main())
