"""The inference benchmarks under one name (the commands the measurement record in docs/benchmarks.md cites).

    python benchmarks/bench_inference.py export   # (a) bench_export.py: export only, same logits, clinical size
    python benchmarks/bench_inference.py e2e      # (b) bench_e2e.py: end to end, stock vs ours (fp32, auto),
                                                  #     bf16-vs-fp32 accuracy guard, RSS breakdown
    python benchmarks/bench_inference.py gpu      # (c) bench_gpu.py: peak GPU memory and time per case (CUDA)
    python benchmarks/bench_inference.py huge     # (d) bench_huge.py: 512x512x1000 input, tiny network
    python benchmarks/bench_inference.py memory   # (e) bench_memory.py: ours' peak RSS stage by stage
    python benchmarks/bench_inference.py patch    # (f) bench_patch.py: one patch, fp32/bf16, channels-last, threads
    python benchmarks/bench_inference.py backends # (g) bench_backends.py: stock vs ours torch vs ours OpenVINO (cold,
                                                  #     warm), where the time goes, 10 mixed cases, trained labels

``bench_inference.py WHAT ARGS`` is ``bench_WHAT.py ARGS``; ``--workdir DIR`` may come before WHAT, as it did
when all of them lived in this file. Shared parts: ``_common.py`` (machine line, tables, fresh-process workers,
peak RSS, stock and ours' commands) and ``_inference_case.py`` (the random-weight cases).
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {"export": "bench_export", "e2e": "bench_e2e", "gpu": "bench_gpu", "huge": "bench_huge",
              "memory": "bench_memory", "patch": "bench_patch", "backends": "bench_backends"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    leading: list[str] = []
    if argv[:1] == ["--workdir"] and len(argv) >= 2:
        leading, argv = argv[:2], argv[2:]
    if not argv or argv[0] not in BENCHMARKS:
        print(__doc__)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    if argv[0] == "patch":
        leading = []  # one patch in memory: no work folder
    return module.main(leading + argv[1:])


if __name__ == "__main__":
    sys.exit(main())
