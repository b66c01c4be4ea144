"""What a `flaxzoo train --profile-steps A:B` trace shows, as text: the time of each traced step and
the XLA operations that took the most of it.

    .venv/bin/python scripts/profile_summary.py WORKDIR [--top 12]

Reads the newest WORKDIR/profile/plugins/profile/*/perfetto_trace.json.gz (the same trace that
TensorBoard's profile plugin and ui.perfetto.dev show).
"""

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path


def newest_trace(workdir: Path) -> Path:
  traces = sorted((workdir / "profile" / "plugins" / "profile").glob("*/perfetto_trace.json.gz"))
  if not traces:
    sys.exit(f"profile_summary: error: no trace under {workdir}/profile; train with "
             f"--profile-steps A:B first")
  return traces[-1]


def summarize(trace_path: Path, top: int) -> dict:
  events = json.loads(gzip.decompress(trace_path.read_bytes()))["traceEvents"]
  thread_names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
                  if e.get("ph") == "M" and e.get("name") == "thread_name"}
  steps = [e for e in events if e.get("ph") == "X" and e["name"] == "train"]
  # XLA's compute threads (tf_XLA...) run the compiled step's kernels (fusions, convolutions, dots).
  kernels = collections.Counter()
  for e in events:
    on_xla_thread = thread_names.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLA")
    if e.get("ph") == "X" and on_xla_thread and "::" not in e["name"]:  # not the runtime wrappers
      kernels[e["name"]] += e.get("dur", 0.0)
  total = sum(kernels.values())
  return {
      "trace": str(trace_path),
      "step_ms": [round(e["dur"] / 1e3, 2) for e in sorted(steps, key=lambda e: e["ts"])],
      "kernel_ms_total": round(total / 1e3, 2),
      "top_kernels": [{"name": name, "ms": round(us / 1e3, 2), "share": round(us / total, 3)}
                      for name, us in kernels.most_common(top)],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", type=Path)
  parser.add_argument("--top", type=int, default=12)
  args = parser.parse_args()
  summary = summarize(newest_trace(args.workdir), args.top)
  print(f"trace: {summary['trace']}")
  print(f"traced steps: {len(summary['step_ms'])}, ms each: {summary['step_ms']}")
  print(f"XLA kernel time, all traced steps: {summary['kernel_ms_total']} ms; the largest:")
  for kernel in summary["top_kernels"]:
    print(f"  {kernel['ms']:8.2f} ms  {kernel['share']:6.1%}  {kernel['name']}")


if __name__ == "__main__":
  main()
