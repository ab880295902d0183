"""`python -m cornserve.executor`."""

from cornserve.executor.main import main

if __name__ == "__main__":
    main()
