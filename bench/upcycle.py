"""Benchmark: ``moetool upcycle`` against ``mergekit-moe`` (mergekit 0.1.5), in the same run.

A dense Mistral of about 0.5B parameters (bf16, 2 shards, random weights, a tiny word-level
tokenizer) is built once under ``--work`` (default ``/tmp/moetool-bench-upcycle``) and upcycled into
8 experts, top-2:

* ``moetool upcycle`` with its defaults (streamed conversion, layer-by-layer verification; the
  full-model logits check runs only when both float32 models fit in 40% of the available memory),
  and again with ``--no-verify`` to separate writing from checking;
* ``mergekit-moe`` with the same base model as every expert and ``gate_mode: random``, from a
  separate virtual environment (``--mergekit-venv``, default ``/tmp/venv-mergekit``; created with
  ``pip install torch==2.13.0`` first, the CPU wheel, then ``mergekit==0.1.5``). When it cannot be
  installed or run, the table says so and moetool's figures are still printed;
* ``cp -r`` of moetool's output, the disk-speed floor for writing that many bytes.

Wall time and peak RSS come from ``/usr/bin/time -v`` around each whole process. Outputs are deleted
after each run (the page cache is dropped only if run as root with ``--drop-caches``).

Usage::

    python bench/upcycle.py
    python bench/upcycle.py --runs 3 --skip-mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DENSE = {  # ~0.47B parameters, 0.94 GB in bf16
    "vocab_size": 64000,
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
}
EXPERTS, TOP_K = 8, 2


BUILD = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from tests.test_data import make_tokenizer
torch.manual_seed(0)
config = AutoConfig.for_model("mistral", **json.loads(sys.argv[2]))
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1], max_shard_size="600MB")
make_tokenizer(path=sys.argv[1])  # mergekit-moe needs a tokenizer; moetool copies it
"""


def build_dense(folder: Path) -> None:
    """Build and save the dense model once (random init, bf16, 2 shards) with a tokenizer.

    In a child process run from the repository root: this script's folder holds bench/inspect.py,
    which would shadow the standard library's inspect module that torch imports.
    """
    if (folder / "config.json").exists():
        return
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-c", BUILD, str(tmp), json.dumps(DENSE)], cwd=ROOT, check=True)
    tmp.rename(folder)


def timed(cmd: list[str], *, env: dict | None = None) -> dict:
    """Run a command under /usr/bin/time -v; wall seconds, peak RSS bytes, exit code, output tail."""
    result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", result.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    seconds = None
    if wall:
        parts = [float(p) for p in wall.group(1).strip().split(":")]
        seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {
        "wall_s": seconds,
        "rss_bytes": int(rss.group(1)) * 1024 if rss else None,
        "rc": result.returncode,
        "stdout": result.stdout,
        "tail": "\n".join((result.stdout + result.stderr).splitlines()[-8:]),
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def drop_caches(enabled: bool) -> None:
    if enabled:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_moetool(dense: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "moetool", "upcycle", str(dense), "-o", str(out), "-e", str(EXPERTS)]
    cmd += ["-k", str(TOP_K), "--json", *extra]
    run = timed(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if run["rc"] == 0:
        doc = json.loads(run["stdout"])
        run["bytes"] = folder_bytes(out)
        run["verification"] = doc["verification"]
        run["timings"] = doc["timings"]
    return run


def mergekit_ready(venv: Path) -> str | None:
    """None when mergekit-moe can run, else why not."""
    exe = venv / "bin" / "mergekit-moe"
    if not exe.exists():
        pip = f"{venv}/bin/pip install"
        return f"no {exe}: python -m venv {venv} && {pip} torch==2.13.0 && {pip} mergekit==0.1.5"
    return None


def run_mergekit(venv: Path, dense: Path, out: Path, work: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    config = work / "mergekit-moe.yml"
    lines = [f"base_model: {dense}", "gate_mode: random", "dtype: bfloat16", f"experts_per_token: {TOP_K}", "experts:"]
    lines += [f"  - source_model: {dense}" for _ in range(EXPERTS)]
    config.write_text("\n".join(lines) + "\n")
    run = timed([str(venv / "bin" / "mergekit-moe"), str(config), str(out)])
    if run["rc"] == 0:
        run["bytes"] = folder_bytes(out)
    return run


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value / 1e9:.2f} GB" if unit == "GB" else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moetool-bench-upcycle"))
    parser.add_argument("--mergekit-venv", type=Path, default=Path("/tmp/venv-mergekit"))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each run (root)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dense = args.work / "dense-mistral-0.5b"
    print(f"building {dense} (once)...", flush=True)
    build_dense(dense)
    print(f"dense model: {folder_bytes(dense) / 1e9:.2f} GB", flush=True)

    rows: dict[str, list[dict]] = {
        "moetool upcycle": [],
        "moetool upcycle --no-verify": [],
        "mergekit-moe": [],
        "cp": [],
    }
    why_not = "skipped (--skip-mergekit)" if args.skip_mergekit else mergekit_ready(args.mergekit_venv)
    for _ in range(args.runs):
        drop_caches(args.drop_caches)
        rows["moetool upcycle"].append(run_moetool(dense, args.work / "out-moetool", []))
        drop_caches(args.drop_caches)
        rows["moetool upcycle --no-verify"].append(run_moetool(dense, args.work / "out-noverify", ["--no-verify"]))
        shutil.rmtree(args.work / "out-noverify", ignore_errors=True)
        if why_not is None:
            drop_caches(args.drop_caches)
            run = run_mergekit(args.mergekit_venv, dense, args.work / "out-mergekit", args.work)
            rows["mergekit-moe"].append(run)
            shutil.rmtree(args.work / "out-mergekit", ignore_errors=True)
            if run["rc"]:
                why_not = f"mergekit-moe failed (exit {run['rc']}): {run['tail']}"
        source = args.work / "out-moetool"
        if source.exists():
            drop_caches(args.drop_caches)
            copy = timed(["cp", "-r", str(source), str(args.work / "out-cp")])
            copy["bytes"] = folder_bytes(args.work / "out-cp")
            rows["cp"].append(copy)
            shutil.rmtree(args.work / "out-cp", ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)

    print(f"\n{EXPERTS} experts, top-{TOP_K}; median of {args.runs} run(s); whole processes, /usr/bin/time -v\n")
    print(f"{'':30} {'wall':>9} {'peak RSS':>10} {'output':>10}   wall per run")
    for name, runs in rows.items():
        ok = [r for r in runs if r["rc"] == 0]
        if not ok:
            note = why_not if name == "mergekit-moe" else (runs[0]["tail"] if runs else "not run")
            print(f"{name:30} {'-':>9} {'-':>10} {'-':>10}   {note}")
            continue
        wall = statistics.median(r["wall_s"] for r in ok)
        rss = statistics.median(r["rss_bytes"] for r in ok)
        each = " ".join(f"{r['wall_s']:.1f}" for r in ok)
        print(f"{name:30} {fmt(wall, 's'):>9} {fmt(rss, 'GB'):>10} {fmt(ok[0]['bytes'], 'GB'):>10}   {each}")
    verified = rows["moetool upcycle"]
    if verified and verified[0]["rc"] == 0:
        doc = verified[0]["verification"]
        checks = ", ".join(
            f"{c['name']} {c['max_abs_diff']:.1e}" for c in doc["checks"] if c["max_abs_diff"] is not None
        )
        print(f"\nmoetool verification: {doc['status']} ({checks}); {'; '.join(doc['notes'])}")
        print(f"moetool timings (s): {verified[0]['timings']}")


if __name__ == "__main__":
    main()
