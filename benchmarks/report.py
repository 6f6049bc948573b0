"""Shared by the benchmarks: machine facts, and writing results as JSON and
Markdown under benchmarks/results/."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _version(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def machine() -> dict:
    import bcc
    return {"kernel": platform.release(), "cpu": _cpu(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "bcc": getattr(bcc, "__version__", None),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_1min": round(os.getloadavg()[0], 2)}   # others' work on the machine shows here


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: described by its docstring, with --out."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=RESULTS, help="where to write NAME.json and NAME.md")
    return ap


def publish(out_dir: str, name: str, result: dict, title: str, how: str, table: str) -> None:
    """Write the result as JSON and Markdown, and print its table."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    m = result["machine"]
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n{how}\n\nKernel {m['kernel']}, {m['cpu']} ({m['cpus']} CPUs), "
                f"bcc {m['bcc']}, {m['date']}.\n\n{table}\n")
    print(table)
