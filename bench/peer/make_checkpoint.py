#!/usr/bin/env python3
"""Writes a seeded random Hugging Face Llama checkpoint (config.json + model.safetensors).

  make_checkpoint.py --shape tinyllama-1.1b --dtype bf16 --out /tmp/tl-bf16
  make_checkpoint.py --shape tiny --dtype f32 --out /tmp/tiny --seed 3

Every matrix is uniform in +-0.02*sqrt(3) (standard deviation 0.02), every
norm weight is 1. Tensor i is drawn from numpy's PCG64 seeded with (seed, i)
in float32 and then rounded to --dtype, so the bf16, f16 and f32 checkpoints
of one seed hold the same values up to rounding. The safetensors file is
written one tensor at a time (bounded memory).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from st_io import f32_to_bf16, write_safetensors  # noqa: E402

# Named shapes. "tiny" is the shape of ../shared/models/aidreams-260k (tied
# embeddings); "tiny-gqa" adds grouped-query attention and an untied lm_head
# (checks the K permutation with fewer KV heads); "tiny-32k" is tiny-gqa with
# TinyLlama's 32000-token vocabulary (a seconds-long smoke test of the whole
# benchmark); "tinyllama-1.1b" is TinyLlama/TinyLlama-1.1B-Chat-v1.0.
SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                 tie_word_embeddings=True),
    "tiny-gqa": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=False),
    "tiny-32k": dict(vocab_size=32000, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     tie_word_embeddings=False),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048, tie_word_embeddings=False),
}

DTYPES = {  # --dtype -> (safetensors dtype, config torch_dtype)
    "f32": ("F32", "float32"),
    "f16": ("F16", "float16"),
    "bf16": ("BF16", "bfloat16"),
}

STD = 0.02


def config_for(shape: dict, torch_dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": STD,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }


def tensor_specs(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, ff, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    specs = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (ff, h)),
            (p + "mlp.up_proj.weight", (ff, h)),
            (p + "mlp.down_proj.weight", (h, ff)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not c["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (v, h)))
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path, help="checkpoint directory (created)")
    args = ap.parse_args()

    st_dtype, torch_dtype = DTYPES[args.dtype]
    config = config_for(SHAPES[args.shape], torch_dtype)
    specs = tensor_specs(config)
    index = {name: i for i, (name, _) in enumerate(specs)}
    shapes = dict(specs)
    bound = STD * math.sqrt(3.0)

    def produce(name: str) -> np.ndarray:
        shape = shapes[name]
        if len(shape) == 1:
            values = np.ones(shape, dtype=np.float32)
        else:
            rng = np.random.default_rng([args.seed, index[name]])
            values = rng.random(shape, dtype=np.float32)
            values *= 2 * bound
            values -= bound
        if st_dtype == "BF16":
            return f32_to_bf16(values)
        return values.astype("<f2" if st_dtype == "F16" else "<f4", copy=False)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (args.out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    write_safetensors(args.out / "model.safetensors",
                      [(name, st_dtype, shape) for name, shape in specs], produce,
                      metadata={"format": "pt"})
    n_params = sum(int(np.prod(s)) for _, s in specs)
    print(f"wrote {args.out} ({args.shape}, {args.dtype}, {n_params / 1e6:.1f}M parameters, seed {args.seed})")


if __name__ == "__main__":
    main()
