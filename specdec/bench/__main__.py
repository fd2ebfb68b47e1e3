"""`python -m specdec.bench bench|report ...`: the command line under a module launcher (`accelerate launch -m`)."""
import sys

from specdec.bench import main

if __name__ == "__main__":
    sys.exit(main())
