#!/usr/bin/env python3
"""Reference goldens for loraserve, computed with Hugging Face transformers + peft.

Run once by a developer and commit the outputs; CI never runs it (torch is several GB).

    python3 tests/golden/generate.py [--shared ../shared] [--python PY | --venv DIR]

Without --python the script creates (or reuses) a venv, by default `.venv-golden/` in the
repository root, and installs tests/golden/requirements.txt into it (set PIP_INDEX_URL /
PIP_EXTRA_INDEX_URL to pick a torch wheel index). It then re-runs itself with that
interpreter, which must have exactly the pinned versions.

All maths is float32 on the CPU with deterministic settings; checkpoints stored as
bf16/f16 are loaded with dtype=float32, so the reference uses their exact upcast values.

Outputs under tests/golden/data/ (tokenizer/ belongs to tests/golden/tokenizer_goldens.py,
which this script runs as its last step when it exists):

manifest.json
  {"generator_versions": {package: version},
   "greedy_min_margin_required": 0.001,
   "model_cases": [{"name", "model_dir", "golden", "num_prompts", "greedy_tokens",
                    "min_greedy_margin", "seed" (random models only), "notes"}],
   "adapter_cases": [{"name", "base" (a model case name), "adapter_dir", "golden",
                      "num_prompts", "greedy_tokens", "min_greedy_margin",
                      "max_logit_delta_vs_base", "seed" (random adapters only), "notes"}],
   "composition_cases": [{"name", "base", "parts": [{"adapter", "adapter_dir", "weight"}],
                          "golden", "num_prompts", "greedy_tokens", "min_greedy_margin",
                          "max_logit_delta_vs_base", "notes"}]}
  Paths are relative to the repository root: the shared model is
  "../shared/models/aidreams-260k", its adapters "../shared/adapters/aidreams-260k/<name>";
  random models live in tests/golden/data/models/<name>, random adapters in
  tests/golden/data/adapters/<name> (written by transformers / peft save_pretrained).

<case>.safetensors (model cases), adapter-<case>.safetensors (adapter cases) and
composition-<case>.safetensors (composition cases), per prompt i:
  prompt.{i}  I32 [len]          input ids, BOS included where the tokenizer adds it
  logits.{i}  F32 [len, vocab]   logits at every prompt position from one full forward
  greedy.{i}  I32 [64]           the 64 argmax tokens after the prompt. EOS does NOT stop the
                                 loop; each step is a full forward over prompt + tokens so
                                 far (no KV cache).
  __metadata__: prompt_text.{i} for prompts given as text (the shared model's prompts).
Random models get random id lists instead: BOS alone, BOS + 8 ids, 23 ids without BOS,
BOS + 39 ids (40 + 64 tokens fit the 128-token context).
At every greedy step the top-1 logit beats the runner-up by more than
greedy_min_margin_required, so a correct implementation reproduces the greedy tokens despite
float rounding differences; random cases also need >= 8 distinct tokens in each greedy
output. Random seeds are advanced until both hold (the manifest records the seed used).
Adapter goldens use PeftModel.from_pretrained(base, adapter_dir) unmerged, in float32;
composition goldens load every part into one PeftModel and serve peft's
add_weighted_adapter(parts, weights, combination_type="cat") adapter, unmerged.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT / "tests" / "golden"
DATA_DIR = GOLDEN_DIR / "data"
REQUIREMENTS = GOLDEN_DIR / "requirements.txt"
TOKENIZER_SCRIPT = GOLDEN_DIR / "tokenizer_goldens.py"

# What the manifest calls the shared directory: tests resolve it from the repository root.
SHARED_IN_MANIFEST = "../shared"
SHARED_MODEL = "models/aidreams-260k"
SHARED_ADAPTERS = ["ocean", "robot", "qv-r4", "attn-r8", "mlp-r16-rslora", "all-r8-bf16"]
# Trained adapters: what their greedy continuation of the empty prompt must start with
# (from shared/README.md); a mismatch means the reference stack is not the one we expect.
SHARED_EXPECTED_START = {
    None: "Echoes of vectors unfold",
    "ocean": "At low tide the rock pools shine",
    "robot": "The robot charged its battery at the station",
}
# Prompt lengths stay <= 64 so prompt + 64 greedy tokens fit the 128-token context.
SHARED_PROMPTS = [
    "",
    "Echoes of vectors",
    "The robot charged its battery",
    "The old lighthouse",
    "caf\u00e9 \u2713 na\u00efve 3.14",
]

GREEDY_TOKENS = 64
GREEDY_MIN_MARGIN = 1e-3
ADAPTER_MIN_DELTA = 1e-2
SEED_ATTEMPTS = 20
# Random cases must not collapse into repeating a token or two: that would test little.
GREEDY_MIN_DISTINCT = 8

# Shapes shared by the random models; every case changes one thing.
VOCAB = 128
BOS, EOS = 1, 2
BASE_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=BOS, eos_token_id=EOS,
                  pad_token_id=None)
# Random prompt lengths: BOS alone, short, without BOS, and the longest (40 + 64 <= 128).
RANDOM_PROMPTS = [(True, 1), (True, 9), (False, 23), (True, 40)]

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


# --------------------------------------------------------------------------------------
# Bootstrap: runs under any python3, finds or builds the reference interpreter.
# --------------------------------------------------------------------------------------

def reference_python(args):
    if args.python:
        return args.python
    venv_dir = Path(args.venv) if args.venv else REPO_ROOT / ".venv-golden"
    python = venv_dir / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-r", str(REQUIREMENTS)], check=True)
    return str(python)


def bootstrap(args):
    python = reference_python(args)
    shared = str(Path(args.shared).resolve())
    # A fixed hash seed makes PEFT write target_modules (a set) in the same order each run.
    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run([python, __file__, "--in-reference-env", "--shared", shared],
                   check=True, cwd=REPO_ROOT, env=env)
    if TOKENIZER_SCRIPT.exists():
        subprocess.run([python, str(TOKENIZER_SCRIPT.relative_to(REPO_ROOT)),
                        "tests/golden/data/tokenizer", "--shared", shared],
                       check=True, cwd=REPO_ROOT)
    else:
        print(f"note: {TOKENIZER_SCRIPT} not found; tokenizer goldens not regenerated")


# --------------------------------------------------------------------------------------
# Reference side: everything below runs inside the pinned environment.
# --------------------------------------------------------------------------------------

def pinned_versions():
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


def check_versions():
    from importlib.metadata import version
    pins = pinned_versions()
    found = {name: version(name) for name in pins}
    wrong = [f"{n} {found[n]} (expected {pins[n]})" for n in pins if found[n] != pins[n]]
    if wrong:
        sys.exit(f"reference environment does not match {REQUIREMENTS}: " + ", ".join(wrong))
    found["python"] = sys.version.split()[0]
    return found


def rel(path):
    return str(Path(path).relative_to(REPO_ROOT))


class Reference:
    """The float32 CPU forward passes and golden files."""

    def __init__(self, shared_dir):
        import torch
        torch.manual_seed(0)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        from transformers.utils import logging
        logging.disable_progress_bar()
        self.torch = torch
        self.shared_dir = Path(shared_dir)

    def load_model(self, model_dir):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.torch.float32, attn_implementation="eager").eval()

    def prompt_logits(self, model, ids):
        with self.torch.no_grad():
            return model(input_ids=self.torch.tensor([ids]), use_cache=False).logits[0]

    def greedy(self, model, ids):
        """64 argmax tokens (EOS does not stop) and the smallest top-1 margin seen."""
        seq, margin = list(ids), math.inf
        for _ in range(GREEDY_TOKENS):
            last = self.prompt_logits(model, seq)[-1]
            top2 = self.torch.topk(last, 2).values
            margin = min(margin, float(top2[0] - top2[1]))
            seq.append(int(last.argmax()))
        return seq[len(ids):], margin

    def run(self, model, prompts):
        """Logits and greedy tokens for each prompt; returns (tensors, per-prompt margins)."""
        torch = self.torch
        tensors, margins = {}, []
        for i, ids in enumerate(prompts):
            tokens, margin = self.greedy(model, ids)
            tensors[f"prompt.{i}"] = torch.tensor(ids, dtype=torch.int32)
            tensors[f"logits.{i}"] = self.prompt_logits(model, ids).float().contiguous()
            tensors[f"greedy.{i}"] = torch.tensor(tokens, dtype=torch.int32)
            margins.append(margin)
        return tensors, margins

    @staticmethod
    def write_golden(path, tensors, texts=None):
        from safetensors.torch import save_file
        metadata = {f"prompt_text.{i}": t for i, t in enumerate(texts or [])}
        save_file(tensors, str(path), metadata=metadata)
        sort_safetensors_header(path)


def sort_safetensors_header(path):
    """safetensors writes __metadata__ in hash-map order, different on every run; sorting
    the header keys (same length, so the data offsets stay valid) makes reruns
    byte-identical, so a regenerated golden only shows in git when its numbers change."""
    data = bytearray(Path(path).read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encoded = text.encode().ljust(size)
    assert len(encoded) == size, f"{path}: re-serialised header is {len(encoded)} bytes"
    data[8:8 + size] = encoded
    Path(path).write_bytes(bytes(data))


def max_logit_delta(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("logits."))


# ---- random base models ---------------------------------------------------------------

def randomize_model(torch, model, seed):
    """Weights with well spread logits (HF's std 0.02 gives near-flat ones).

    Embeddings and the LM head ~ N(0, 0.3^2) spread the logits over a few units. Linear
    weights ~ N(0, g^2/fan_in) with g = 1.5, and g = 3 for the projections back into the
    residual stream (o_proj, down_proj): with tied embeddings a weak residual update makes
    every token predict itself, and greedy decoding repeats one token forever. Norm weights
    in [0.7, 1.3] and biases ~ N(0, 0.3^2) so that forgetting either shows in the logits.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(0.7 + 0.6 * torch.rand(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                gain = 3.0 if "o_proj" in name or "down_proj" in name else 1.5
                p.copy_(gain * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def random_prompts(torch, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    prompts = []
    for with_bos, length in RANDOM_PROMPTS:
        body = torch.randint(3, VOCAB, (length - int(with_bos),), generator=gen).tolist()
        prompts.append([BOS] * with_bos + body)
    return prompts


def to_published_llama3_layout(config):
    """transformers 5 writes "rope_parameters" (rope_theta inside) and "dtype"; published
    Llama 3.x checkpoints have top-level "rope_theta", "rope_scaling" and "torch_dtype"."""
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    return config


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # Wavelengths 2*pi*10000^(i/8) of head_dim 16 fall on all three sides of
               # 32/4 = 8 and 32/1 = 32, and positions up to 104 exceed 32.
               "original_max_position_embeddings": 32}


def random_model_cases():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    import torch
    shape = dict(BASE_SHAPE)
    return [
        dict(name="gqa", seed=11, notes="llama, 4 query heads sharing 2 KV heads, tied embeddings",
             config=LlamaConfig(**shape, tie_word_embeddings=True, rms_norm_eps=1e-5)),
        dict(name="qwen2", seed=21,
             notes="Qwen2ForCausalLM: non-zero q/k/v biases, GQA 4/2, rope_theta 1e6, tied",
             config=Qwen2Config(**shape, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                rope_parameters={"rope_type": "default",
                                                 "rope_theta": 1000000.0})),
        dict(name="llama3-rope", seed=31,
             notes="llama3 rope scaling, factor 4, original context 32; config.json in the "
                   "published Llama 3 layout (top-level rope_theta, rope_scaling)",
             config=LlamaConfig(**shape, tie_word_embeddings=True,
                                rope_parameters=dict(LLAMA3_ROPE)),
             edit_config=to_published_llama3_layout),
        dict(name="llama3-rope-params", seed=41,
             notes="llama3 rope scaling as transformers 5 writes it (rope_parameters); "
                   "a single layer",
             config=LlamaConfig(**dict(shape, num_hidden_layers=1), tie_word_embeddings=True,
                                rope_parameters=dict(LLAMA3_ROPE))),
        dict(name="untied", seed=51,
             notes="MistralForCausalLM with a separate lm_head, no sliding window",
             config=MistralConfig(**shape, tie_word_embeddings=False, sliding_window=None)),
        dict(name="bf16", seed=61, notes="weights stored as BF16, golden from upcast values",
             config=LlamaConfig(**dict(shape, num_key_value_heads=4), tie_word_embeddings=False),
             save_dtype=torch.bfloat16),
        dict(name="f16", seed=71, notes="weights stored as F16, golden from upcast values",
             config=LlamaConfig(**dict(shape, num_key_value_heads=4), tie_word_embeddings=True),
             save_dtype=torch.float16),
        dict(name="sharded", seed=81,
             notes="save_pretrained(max_shard_size=64KB): several shards + index.json",
             config=LlamaConfig(**shape, tie_word_embeddings=False), max_shard_size="64KB"),
        dict(name="explicit-head-dim", seed=91,
             notes="hidden 64, 4 heads of head_dim 32 (q_proj 64->128), GQA 4/2",
             config=LlamaConfig(**shape, head_dim=32, tie_word_embeddings=True)),
    ]


def write_random_model(ref, case, seed, model_dir):
    from transformers import AutoModelForCausalLM
    torch = ref.torch
    shutil.rmtree(model_dir, ignore_errors=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(case["config"], dtype=torch.float32)
    randomize_model(torch, model, seed)
    model.to(case.get("save_dtype", torch.float32))
    model.save_pretrained(model_dir, max_shard_size=case.get("max_shard_size", "50GB"))
    if "edit_config" in case:
        path = model_dir / "config.json"
        config = case["edit_config"](json.loads(path.read_text()))
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_random_model(ref, case, model, model_dir):
    """Guards that the case exercises what its name says."""
    if case.get("max_shard_size"):
        shards = list(model_dir.glob("model-*-of-*.safetensors"))
        assert len(shards) >= 3 and (model_dir / "model.safetensors.index.json").exists(), \
            f"{model_dir}: expected >= 3 shards and an index, got {len(shards)} shards"
    if case["name"] == "qwen2":
        assert float(model.model.layers[0].self_attn.q_proj.bias.detach().abs().max()) > 0.1
    if case["name"].startswith("llama3-rope"):
        # Some inverse frequencies must be unscaled, some divided by the factor, some smoothed.
        head_dim = model.config.head_dim
        plain = 1.0 / (10000.0 ** (ref.torch.arange(0, head_dim, 2).double() / head_dim))
        ratio = (plain / model.model.rotary_emb.inv_freq.double()).tolist()
        kinds = {"same" if abs(r - 1) < 1e-6 else "scaled" if abs(r - 4) < 1e-6 else "smooth"
                 for r in ratio}
        assert kinds == {"same", "scaled", "smooth"}, f"{model_dir}: llama3 rope ratios {ratio}"


def weakness(tensors, margins, min_distinct):
    """Why a golden would be a fragile or weak test, or None when it is usable."""
    if min(margins) <= GREEDY_MIN_MARGIN:
        return (f"greedy top-1 margins {[f'{m:.3g}' for m in margins]} not all > "
                f"{GREEDY_MIN_MARGIN}")
    distinct = [len(set(tensors[f"greedy.{i}"].tolist())) for i in range(len(margins))]
    if min(distinct) < min_distinct:
        return f"greedy outputs have {distinct} distinct tokens, need >= {min_distinct}"
    return None


def first_usable_seed(name, first_seed, attempt):
    """Calls attempt(seed) -> (tensors, margins, ...) for successive seeds until the golden
    is usable; returns (seed, what attempt returned)."""
    for seed in range(first_seed, first_seed + SEED_ATTEMPTS):
        result = attempt(seed)
        reason = weakness(result[0], result[1], GREEDY_MIN_DISTINCT)
        if reason is None:
            return seed, result
        print(f"{name}: seed {seed} rejected: {reason}")
    sys.exit(f"{name}: no usable seed in {first_seed}..{first_seed + SEED_ATTEMPTS - 1}")


def case_entry(name, golden, margins, **fields):
    return dict(name=name, **fields, golden=rel(golden), num_prompts=len(margins),
                greedy_tokens=GREEDY_TOKENS, min_greedy_margin=min(margins))


def shared_model_case(ref):
    from transformers import AutoTokenizer
    name, model_dir = "aidreams-260k", ref.shared_dir / SHARED_MODEL
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(t, add_special_tokens=True).input_ids for t in SHARED_PROMPTS]
    assert all(len(p) + GREEDY_TOKENS <= 128 for p in prompts), [len(p) for p in prompts]
    tensors, margins = ref.run(ref.load_model(model_dir), prompts)
    check_start(tokenizer, tensors, None)
    reason = weakness(tensors, margins, 1)
    if reason:
        sys.exit(f"{name}: {reason}; change SHARED_PROMPTS")
    golden = DATA_DIR / f"{name}.safetensors"
    ref.write_golden(golden, tensors, SHARED_PROMPTS)
    print(f"{name}: min margin {min(margins):.4g}")
    base = dict(tensors=tensors, tokenizer=tokenizer, prompts=prompts, model_dir=model_dir)
    return case_entry(name, golden, margins, model_dir=f"{SHARED_IN_MANIFEST}/{SHARED_MODEL}",
                      notes="shared trained model; prompts tokenized with AutoTokenizer, "
                            "add_special_tokens=True"), base


def random_model_case(ref, case):
    name, model_dir = case["name"], DATA_DIR / "models" / case["name"]

    def attempt(seed):
        write_random_model(ref, case, seed, model_dir)
        model = ref.load_model(model_dir)
        check_random_model(ref, case, model, model_dir)
        prompts = random_prompts(ref.torch, seed)
        return ref.run(model, prompts) + (prompts,)

    seed, (tensors, margins, prompts) = first_usable_seed(name, case["seed"], attempt)
    golden = DATA_DIR / f"{name}.safetensors"
    ref.write_golden(golden, tensors)
    print(f"{name}: seed {seed}, min margin {min(margins):.4g}")
    base = dict(tensors=tensors, prompts=prompts, model_dir=model_dir)
    return case_entry(name, golden, margins, model_dir=rel(model_dir), seed=seed,
                      notes=case["notes"]), base


def model_cases(ref):
    """Manifest entries and, by case name, what adapter cases on that base need."""
    entry, base = shared_model_case(ref)
    entries, bases = [entry], {entry["name"]: base}
    for case in random_model_cases():
        entry, bases[case["name"]] = random_model_case(ref, case)
        entries.append(entry)
    return entries, bases


def check_start(tokenizer, tensors, adapter):
    """The greedy continuation of the empty prompt (prompt 0) must match shared/README.md."""
    if adapter not in SHARED_EXPECTED_START:
        return
    text = tokenizer.decode(tensors["greedy.0"].tolist(), skip_special_tokens=True)
    expected = SHARED_EXPECTED_START[adapter]
    if not text.lstrip(' "').startswith(expected):
        sys.exit(f"{adapter or 'base'}: greedy continuation of \"\" is {text!r}, "
                 f"expected it to start with {expected!r}")
    print(f"{adapter or 'base'}: greedy of \"\": {text[:60]!r}")


# ---- adapters ---------------------------------------------------------------------------

def modules(layers, projections):
    """Expected {module path: rank} of an adapter file, e.g. layers.0.self_attn.q_proj."""
    return {f"layers.{layer}.{'self_attn' if p in ATTENTION else 'mlp'}.{p}": rank
            for layer in layers for p, rank in projections.items()}


def random_adapter_cases():
    import torch
    all8 = {p: 8 for p in ALL_PROJECTIONS}
    rank_pattern = {**modules([0, 1], all8), **modules([0, 1], {"q_proj": 4})}
    rank_pattern["layers.1.mlp.down_proj"] = 2
    return [
        dict(name="rank-alpha-pattern", base="gqa", seed=101,
             notes="per-module ranks and alphas: q_proj r4, layer 1 down_proj r2, v_proj "
                   "alpha 4, layer 0 o_proj alpha 32, others r8 alpha 16",
             config=dict(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS,
                         rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
                         alpha_pattern={"v_proj": 4, "layers.0.self_attn.o_proj": 32}),
             expect=rank_pattern),
        dict(name="layers-to-transform", base="untied", seed=111,
             notes="layers_to_transform [1] with layers_pattern \"layers\", r4 alpha 8",
             config=dict(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS,
                         layers_to_transform=[1], layers_pattern="layers"),
             expect=modules([1], {p: 4 for p in ALL_PROJECTIONS})),
        dict(name="regex-targets", base="explicit-head-dim", seed=121,
             notes="target_modules regex: layer 0 q/v, layer 1 gate/down; r8 alpha 8",
             config=dict(r=8, lora_alpha=8,
                         target_modules=r".*\.layers\.0\.self_attn\.(q_proj|v_proj)$"
                                        r"|.*\.layers\.1\.mlp\.(gate_proj|down_proj)$"),
             expect={**modules([0], {"q_proj": 8, "v_proj": 8}),
                     **modules([1], {"gate_proj": 8, "down_proj": 8})}),
        dict(name="rslora", base="qwen2", seed=131,
             notes="use_rslora (scale alpha/sqrt(r) = 2), r16 alpha 8, on biased q/k/v and o",
             config=dict(r=16, lora_alpha=8, use_rslora=True,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
             expect=modules([0, 1], {p: 16 for p in ATTENTION})),
        dict(name="f16-tensors", base="llama3-rope", seed=141,
             notes="all seven projections, r8 alpha 16, tensors stored as F16",
             config=dict(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS),
             expect=modules([0, 1], all8), save_dtype=torch.float16),
        dict(name="bf16-tensors", base="sharded", seed=151,
             notes="q/v/down, r8 alpha 32, tensors stored as BF16, base model sharded",
             config=dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"]),
             expect=modules([0, 1], {"q_proj": 8, "v_proj": 8, "down_proj": 8}),
             save_dtype=torch.bfloat16),
        dict(name="rank64", base="bf16", seed=161,
             notes="rank 64 = hidden size, alpha 32, q_proj and down_proj, BF16-stored base",
             config=dict(r=64, lora_alpha=32, target_modules=["q_proj", "down_proj"]),
             expect=modules([0, 1], {"q_proj": 64, "down_proj": 64})),
        dict(name="dora", base="untied", seed=171,
             notes="use_dora on all seven projections, r8 alpha 16; magnitudes randomised "
                   "around the column norms of W",
             config=dict(r=8, lora_alpha=16, use_dora=True, target_modules=ALL_PROJECTIONS),
             expect=modules([0, 1], all8)),
        dict(name="dora-qwen2", base="qwen2", seed=181,
             notes="use_dora on biased q/k/v (bias outside the magnitude scaling) and on the "
                   "lm_head, r4 alpha 8",
             config=dict(r=4, lora_alpha=8, use_dora=True,
                         target_modules=["q_proj", "k_proj", "v_proj", "lm_head"]),
             expect=modules([0, 1], {p: 4 for p in ["q_proj", "k_proj", "v_proj"]})),
        dict(name="embed-lm-head", base="untied", seed=191,
             notes="LoRA on embed_tokens (lora_embedding_A/B) and lm_head besides q/v, r8 "
                   "alpha 16; saved with save_embedding_layers (the base embedding and "
                   "lm_head copies are in the file)",
             config=dict(r=8, lora_alpha=16,
                         target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
             expect=modules([0, 1], {"q_proj": 8, "v_proj": 8})),
        dict(name="modules-to-save", base="sharded", seed=201,
             notes="modules_to_save lm_head, embed_tokens and every RMS norm (\"norm\" ends "
                   "model.norm and each layer's two), perturbed; LoRA on o/down r4 alpha 8",
             config=dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"],
                         modules_to_save=["lm_head", "embed_tokens", "norm"]),
             expect=modules([0, 1], {"o_proj": 4, "down_proj": 4})),
    ]


def adapter_file_ranks(adapter_dir):
    from safetensors import safe_open
    ranks = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            m = re.fullmatch(r"base_model\.model\.model\.(.+)\.lora_A\.weight", key)
            if m:
                ranks[m.group(1)] = f.get_slice(key).get_shape()[0]
    return ranks


def write_random_adapter(ref, case, seed, base_dir, adapter_dir):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    torch = ref.torch
    shutil.rmtree(adapter_dir, ignore_errors=True)
    torch.manual_seed(seed)
    config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **case["config"])
    model = get_peft_model(ref.load_model(base_dir), config)
    # B must be non-zero (PEFT's default init makes it zero and the adapter a no-op).
    # DoRA magnitudes start as the column norms of W (a no-op): spread them by +-20 %;
    # lora_embedding_A is [r, vocab] and B [hidden, r], the other way round from Linear's;
    # modules_to_save copies start as the base's: perturb them by 10 % of their spread.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif ".lora_embedding_A." in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif ".lora_embedding_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif ".modules_to_save." in name:
                p.add_(0.1 * p.std() * torch.randn(p.shape, generator=gen))
    model.peft_config["default"].base_model_name_or_path = rel(base_dir)
    model.save_pretrained(adapter_dir, safe_serialization=True)
    weights = adapter_dir / "adapter_model.safetensors"
    if "save_dtype" in case:
        tensors = {k: v.to(case["save_dtype"]) for k, v in load_file(str(weights)).items()}
        save_file(tensors, str(weights), metadata={"format": "pt"})
    ranks = adapter_file_ranks(adapter_dir)
    assert ranks == case["expect"], f"{adapter_dir}: modules/ranks {ranks} != {case['expect']}"


def stored_parameter_name(key, params):
    """The PeftModel parameter a saved tensor holds: save_pretrained drops the adapter name
    ("default") from LoRA tensors and "modules_to_save.default" from saved copies."""
    for name in [key.replace(".weight", ".default.weight"),
                 re.sub(r"\.(lora_embedding_[AB]|lora_magnitude_vector)$", r".\1.default", key),
                 re.sub(r"\.lora_magnitude_vector$", ".lora_magnitude_vector.default.weight", key),
                 re.sub(r"\.weight$", ".modules_to_save.default.weight", key), key]:
        if name in params:
            return name
    raise KeyError(f"{key}: no parameter of the PeftModel holds it")


def load_adapter(ref, base_dir, adapter_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    model = PeftModel.from_pretrained(ref.load_model(base_dir), str(adapter_dir)).eval()
    # The reference must use exactly the stored values, upcast: compare every LoRA tensor.
    stored = load_file(str(adapter_dir / "adapter_model.safetensors"))
    # remove_duplicate=False: a tied lm_head's weight is the embedding's parameter.
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, value in stored.items():
        param = params[stored_parameter_name(key, params)]
        assert param.dtype == ref.torch.float32 and ref.torch.equal(param, value.float()), key
    return model


def run_adapter(ref, name, base, adapter_dir):
    """(tensors, margins, largest logit change against the base model)."""
    tensors, margins = ref.run(load_adapter(ref, base["model_dir"], adapter_dir), base["prompts"])
    delta = max_logit_delta(tensors, base["tensors"])
    if delta <= ADAPTER_MIN_DELTA:
        sys.exit(f"{adapter_dir}: adapter changes the logits by only {delta}, "
                 f"need > {ADAPTER_MIN_DELTA}")
    return tensors, margins, delta


def adapter_cases(ref, bases):
    entries = []
    shared = bases["aidreams-260k"]
    for name in SHARED_ADAPTERS:
        adapter_dir = ref.shared_dir / "adapters" / "aidreams-260k" / name
        tensors, margins, delta = run_adapter(ref, name, shared, adapter_dir)
        check_start(shared["tokenizer"], tensors, name)
        reason = weakness(tensors, margins, 1)
        if reason:
            sys.exit(f"{name}: {reason}; change SHARED_PROMPTS")
        golden = DATA_DIR / f"adapter-{name}.safetensors"
        ref.write_golden(golden, tensors, SHARED_PROMPTS)
        print(f"adapter {name}: min margin {min(margins):.4g}, logit delta {delta:.4g}")
        entries.append(case_entry(
            name, golden, margins, base="aidreams-260k",
            adapter_dir=f"{SHARED_IN_MANIFEST}/adapters/aidreams-260k/{name}",
            max_logit_delta_vs_base=delta, notes="shared adapter"))

    for case in random_adapter_cases():
        name, base = case["name"], bases[case["base"]]
        adapter_dir = DATA_DIR / "adapters" / name

        def attempt(seed):
            write_random_adapter(ref, case, seed, base["model_dir"], adapter_dir)
            return run_adapter(ref, name, base, adapter_dir)

        seed, (tensors, margins, delta) = first_usable_seed(name, case["seed"], attempt)
        golden = DATA_DIR / f"adapter-{name}.safetensors"
        ref.write_golden(golden, tensors)
        print(f"adapter {name}: seed {seed}, min margin {min(margins):.4g}, "
              f"logit delta {delta:.4g}")
        entries.append(case_entry(name, golden, margins, base=case["base"],
                                  adapter_dir=rel(adapter_dir), seed=seed,
                                  max_logit_delta_vs_base=delta, notes=case["notes"]))
    return entries


# ---- compositions -----------------------------------------------------------------------

def composition_cases():
    """Weighted mixes of the shared adapters, made by peft's add_weighted_adapter(...,
    combination_type="cat"): per module the parts' A stacked (each times weight x scale) and
    B concatenated, at r = lora_alpha = the sum of the ranks. peft's composed adapter keeps the
    first part's use_rslora, so the first part is never rsLoRA: the composed scale is then 1
    and the golden is the plain weighted sum of the parts' low-rank terms."""
    return [
        dict(name="compose-ocean-robot", parts=[("ocean", 1.0), ("robot", 0.5)],
             notes="the two trained adapters (all seven projections, r8), robot at half weight"),
        dict(name="compose-mixed",
             parts=[("attn-r8", 0.8), ("mlp-r16-rslora", -0.5), ("qv-r4", 1.2),
                    ("all-r8-bf16", 0.4)],
             notes="four seeded adapters of different targets, ranks (4 to 16), rsLoRA and "
                   "bf16 tensors, one weight negative: composed ranks 20 on q/v, 16 on k/o, "
                   "24 on the MLP (peft zero-pads every module to 36)"),
    ]


def run_composition(ref, case, base):
    from peft import PeftModel
    shared = ref.shared_dir / "adapters" / "aidreams-260k"
    names = [name for name, _ in case["parts"]]
    model = PeftModel.from_pretrained(ref.load_model(base["model_dir"]), str(shared / names[0]),
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(shared / name), adapter_name=name)
    assert not model.peft_config[names[0]].use_rslora, f"{case['name']}: first part is rsLoRA"
    model.add_weighted_adapter(adapters=names, weights=[w for _, w in case["parts"]],
                               adapter_name="composed", combination_type="cat")
    model.set_adapter("composed")
    return ref.run(model.eval(), base["prompts"])


def composition_entries(ref, bases):
    entries = []
    shared = bases["aidreams-260k"]
    for case in composition_cases():
        name = case["name"]
        tensors, margins = run_composition(ref, case, shared)
        delta = max_logit_delta(tensors, shared["tensors"])
        reason = weakness(tensors, margins, 1)
        if reason or delta <= ADAPTER_MIN_DELTA:
            sys.exit(f"{name}: {reason or f'logit delta {delta}'}; change its weights")
        golden = DATA_DIR / f"composition-{name}.safetensors"
        ref.write_golden(golden, tensors, SHARED_PROMPTS)
        print(f"composition {name}: min margin {min(margins):.4g}, logit delta {delta:.4g}")
        parts = [dict(adapter=adapter, weight=weight,
                      adapter_dir=f"{SHARED_IN_MANIFEST}/adapters/aidreams-260k/{adapter}")
                 for adapter, weight in case["parts"]]
        entries.append(case_entry(name, golden, margins, base="aidreams-260k", parts=parts,
                                  max_logit_delta_vs_base=delta, notes=case["notes"]))
    return entries


def generate(shared_dir):
    versions = check_versions()
    for path in [DATA_DIR / "models", DATA_DIR / "adapters"]:
        shutil.rmtree(path, ignore_errors=True)
    for path in list(DATA_DIR.glob("*.safetensors")) + [DATA_DIR / "manifest.json"]:
        path.unlink(missing_ok=True)
    DATA_DIR.mkdir(parents=True, exist_ok=True)

    ref = Reference(shared_dir)
    manifest = {"generator_versions": versions,
                "greedy_min_margin_required": GREEDY_MIN_MARGIN}
    manifest["model_cases"], bases = model_cases(ref)
    manifest["adapter_cases"] = adapter_cases(ref, bases)
    manifest["composition_cases"] = composition_entries(ref, bases)
    (DATA_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(REPO_ROOT / SHARED_IN_MANIFEST),
                        help="shared data directory (default: ../shared from the repo root)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--python", help="reuse this interpreter; it must have the pinned "
                                        "versions of tests/golden/requirements.txt")
    where.add_argument("--venv", help="venv to create or reuse (default: .venv-golden)")
    parser.add_argument("--in-reference-env", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_reference_env:
        generate(args.shared)
    else:
        bootstrap(args)


if __name__ == "__main__":
    main()
