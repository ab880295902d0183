"""`python -m cornserve.eric`."""

from cornserve.eric.main import main

main()
