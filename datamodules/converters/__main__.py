"""``python -m datamodules.converters NAME --root DIR --out B.json`` (same as ``instsearch convert``)."""
import sys

from datamodules.converters import main

sys.exit(main())
