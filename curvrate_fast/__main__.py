"""``python -m curvrate_fast {demo, bench, reproduce}``; see :mod:`curvrate_fast.cli`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
