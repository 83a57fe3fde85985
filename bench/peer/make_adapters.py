#!/usr/bin/env python3
"""Writes N seeded random PEFT LoRA adapters for a Hugging Face Llama checkpoint.

  make_adapters.py --base /tmp/tl-bf16 --count 8 --rank 16 --out /tmp/adapters
  -> /tmp/adapters/a0 ... a7 (adapter_config.json + adapter_model.safetensors)

The same recipe as loraserve's adapters::WriteDummyAdapter (what
`grpc_load --make-adapters` loads): every one of the seven projections of
every layer, alpha = 2 * rank, F32, lora_A uniform with standard deviation
1/sqrt(in_features), lora_B uniform with standard deviation 0.01 (nonzero, so
the adapter changes the output); adapter i is seeded with i (numpy's PCG64,
so the values differ from the C++ generator's, the shapes and scales do not).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from st_io import write_safetensors  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def module_dims(c: dict) -> dict[str, tuple[int, int]]:
    h, ff = c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q = c["num_attention_heads"] * head_dim
    kv = (c.get("num_key_value_heads") or c["num_attention_heads"]) * head_dim
    return {  # (in, out)
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h),
    }


def module_path(layer: int, module: str) -> str:
    group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{group}.{module}"


def write_adapter(out: Path, config: dict, rank: int, alpha: float, seed: int, modules: list[str]) -> None:
    dims = module_dims(config)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    specs = []
    for layer in range(config["num_hidden_layers"]):
        for module in modules:
            fan_in, fan_out = dims[module]
            path = module_path(layer, module)
            for suffix, shape, std in ((".lora_A.weight", (rank, fan_in), 1.0 / math.sqrt(fan_in)),
                                       (".lora_B.weight", (fan_out, rank), 0.01)):
                bound = std * math.sqrt(3.0)
                x = rng.random(shape, dtype=np.float32) * np.float32(2 * bound) - np.float32(bound)
                tensors[path + suffix] = x
                specs.append((path + suffix, "F32", shape))
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": modules, "bias": "none", "base_model_name_or_path": "dummy",
    }, indent=2) + "\n")
    write_safetensors(out / "adapter_model.safetensors", specs, tensors.__getitem__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, type=Path, help="HF checkpoint dir (its config.json is read)")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="default: 2 * rank")
    ap.add_argument("--modules", default=",".join(MODULES))
    ap.add_argument("--out", required=True, type=Path, help="adapters go to OUT/a0 .. OUT/a{count-1}")
    args = ap.parse_args()
    config = json.loads((args.base / "config.json").read_text())
    modules = [m for m in args.modules.split(",") if m]
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    for i in range(args.count):
        write_adapter(args.out / f"a{i}", config, args.rank, alpha, i, modules)
    print(f"wrote {args.count} adapters (rank {args.rank}, alpha {alpha:g}, {len(modules)} modules) to {args.out}")


if __name__ == "__main__":
    main()
