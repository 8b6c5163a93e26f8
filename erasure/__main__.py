"""`python -m erasure …` is the `erasure` command (for `accelerate launch -m erasure …` and torchrun)."""

from erasure.cli import main

if __name__ == "__main__":
    main()
