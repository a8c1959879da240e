"""``python -m instsearch.synthetic``: the same as ``instsearch synth``."""
from instsearch.synthetic.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
