"""``python -m instsearch.datamodules.converters NAME --root DIR --out B.json`` (same as ``instsearch convert``)."""
import sys

from instsearch.datamodules.converters import main

sys.exit(main())
