"""Random MoE checkpoints with the layer shapes of real models, written tensor by tensor.

The tensors a config implies come from moetool's family registry (``planned_tensors``), so the files
look like the family's Hub checkpoints (per-expert names, bf16); values are seeded random normals
(std 0.02, norms 1), generated and written one tensor at a time: building an 8-layer model needs no
more memory than its largest tensor. The tokenizer is the example model's (a 4096-token BPE), so the
commands run on real text.

Usage (also imported by the other bench scripts)::

    python bench/real_shape.py OUT --preset qwen3-moe-1024 --layers 8
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse
import json
import shutil
from typing import Any

EXAMPLE = ROOT / "examples" / "tiny-moe"

#: name -> config.json fields (the layer count is set per build).
PRESETS: dict[str, dict[str, Any]] = {
    # The shape issue 11's memory bench names: hidden 1024, 64 experts of width 512, top-8.
    "qwen3-moe-1024": {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "moe_intermediate_size": 512,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "norm_topk_prob": True,
    },
    # Qwen3-30B-A3B's layer: hidden 2048, 128 experts of width 768, top-8.
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "norm_topk_prob": True,
    },
    # Mixtral-8x7B's layer: hidden 4096, 8 experts of width 14336, top-2.
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
}

COMMON = {
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "dtype": "bfloat16",
    "use_cache": False,
}


def config_for(preset: str, layers: int) -> dict[str, Any]:
    return {**COMMON, **PRESETS[preset], "num_hidden_layers": layers}


def build(out: Path, preset: str, layers: int, *, seed: int = 0, max_shard_size: int = 2 * 10**9) -> Path:
    """Write a random checkpoint of ``layers`` layers of the preset's shape into ``out`` (bf16)."""
    import torch

    from moetool.arch.dims import resolve_dims
    from moetool.arch.plan import planned_tensors
    from moetool.arch.registry import family_for_config
    from moetool.io.writer import ShardedWriter, write_json

    config = config_for(preset, layers)
    spec = family_for_config(config)
    dims = resolve_dims(spec, config)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with ShardedWriter(out, max_shard_size=max_shard_size) as writer:
        for tensor in planned_tensors(spec, dims):
            if len(tensor.shape) == 1 and "norm" in tensor.name:
                value = torch.ones(tensor.shape)
            else:
                value = torch.randn(tensor.shape, generator=generator) * 0.02
            writer.add(tensor.name, value.to(torch.bfloat16))
    write_json(out / "config.json", config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EXAMPLE / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-moe-1024")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    build(args.out, args.preset, args.layers)
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(json.dumps({"out": str(args.out), "preset": args.preset, "layers": args.layers, "bytes": size}))


if __name__ == "__main__":
    main()
