"""``python -m asmlp_min`` (and ``torchrun -m asmlp_min``) runs the command-line interface."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
