"""`accelerate launch erasure/train.py --recipe recipes/….yaml [--key value …]`

Run as a file, Python puts this folder first on sys.path, where our module names (config, tiny, …)
could shadow installed packages; drop it before importing anything else.
"""

import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))  # the repository, for runs from a plain checkout

    from erasure.cli import main  # the same command as `erasure train`, with its error handling

    main(["train", *sys.argv[1:]])
