"""What the shard writer adds to ``instsearch extract``'s predict loop.

    python benchmarks/extract_overhead.py [--config configs/deep_region_cnn_synthetic.yaml]
                                          [--part-size 20] [--repeats 3] [--dtype float16]

Runs ``instsearch extract`` (Lightning ``predict`` with :class:`RegionShardWriter`) ``--repeats``
times, alternating with the same predict loop whose writer hooks do nothing (same sampler, same
loaders, no rows kept), and prints per run:

* the predict time with and without the writer, and their ratio (the A/B figure; on a shared
  2-core machine it moves by a few percent from run to run either way);
* the time spent inside the writer's hooks (rows to numpy, buffering, writing and renaming the
  parts' ``.npy`` / ``.parquet`` / ``.json`` files) as a share of the predict time without them --
  the direct figure, independent of run-to-run noise.

A small ``--part-size`` makes many parts and so the most file writes per image (the worst case
for the writer). Measurements: ``docs/scale.md``, section "Extraction".
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/deep_region_cnn_synthetic.yaml")
    p.add_argument("--part-size", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args, rest = p.parse_known_args(argv)

    import pytorch_lightning as pl

    from instsearch.cli import main as cli_main
    from instsearch.eval.shard_extraction import RegionShardWriter

    hooks = ("write_on_batch_end", "on_predict_end")
    real = {name: getattr(RegionShardWriter, name) for name in hooks}
    spent = {"writer": 0.0, "predict": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent["writer"] += time.perf_counter() - t0
        return wrapper

    def noop(*a, **k):
        return None

    real_predict = pl.Trainer.predict

    def predict(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return real_predict(self, *a, **k)
        finally:
            spent["predict"] += time.perf_counter() - t0

    pl.Trainer.predict = predict
    rows = []
    work = Path(tempfile.mkdtemp(prefix="extract_overhead_"))
    try:
        for repeat in range(args.repeats + 1):  # the first pair warms caches and the synthetic data up
            result = {}
            # alternate which goes first, so that an order effect does not read as the writer's cost
            for mode in (("writer", "none") if repeat % 2 else ("none", "writer")):
                for name in hooks:
                    setattr(RegionShardWriter, name, timed(real[name]) if mode == "writer" else noop)
                spent.update(writer=0.0, predict=0.0)
                out = work / f"{mode}-{repeat}"
                code = cli_main(["extract", "--config", args.config, "--out", str(out), "--part-size",
                                 str(args.part_size), "--dtype", args.dtype, "--trainer.enable_progress_bar", "false",
                                 *rest])
                if mode == "writer" and code != 0:
                    raise SystemExit(f"instsearch extract failed with exit code {code}")
                result[mode] = dict(spent)
                shutil.rmtree(out, ignore_errors=True)
            if repeat == 0:
                continue
            with_writer, without = result["writer"]["predict"], result["none"]["predict"]
            inside = result["writer"]["writer"]
            rows.append((with_writer, without, inside))
            print(f"run {repeat}: predict {with_writer:.2f} s with the writer, {without:.2f} s without "
                  f"(x{with_writer / without:.3f}); {inside:.3f} s inside the writer's hooks = "
                  f"{100 * inside / (with_writer - inside):.2f} % of the loop without them", flush=True)
    finally:
        for name in hooks:
            setattr(RegionShardWriter, name, real[name])
        pl.Trainer.predict = real_predict
        shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(w / n for w, n, _ in rows)
    share = statistics.median(i / (w - i) for w, _, i in rows)
    print(f"median of {len(rows)}: x{ratio:.3f} predict time with the writer; writer hooks {100 * share:.2f} % "
          f"of the loop (config {args.config}, part size {args.part_size}, {args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
