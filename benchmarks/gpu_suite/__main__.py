"""`python -m benchmarks.gpu_suite`: run the device suite (see the package docstring)."""

from benchmarks.gpu_suite.runner import main

main()
