#!/usr/bin/env python3
"""Hugging Face Llama checkpoints and PEFT LoRA adapters -> GGUF for llama.cpp.

  hf_to_gguf.py model MODEL_DIR OUT.gguf --outtype f16|bf16|q8_0|f32
  hf_to_gguf.py lora  ADAPTER_DIR OUT.gguf --base MODEL_DIR [--outtype f32|f16|bf16|q8_0]

A re-implementation, on numpy and the `gguf` package only (no torch), of what
llama.cpp's convert_hf_to_gguf.py (LlamaModel) and convert_lora_to_gguf.py do
for plain Llama checkpoints:

* tensor names: token_embd, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,
  ffn_norm,ffn_gate,ffn_up,ffn_down}, output_norm, output (absent when the
  embeddings are tied: llama.cpp then reuses token_embd);
* the rows of q_proj and k_proj are permuted from Hugging Face's rotate-half
  rotary layout back to the interleaved one llama.cpp's llama graph uses
  (per head: reshape (2, head_dim/2) -> transpose); k uses the KV head count;
* 1-D tensors (the norms) stay F32; the rest take --outtype; a Q8_0 tensor
  whose rows are not a multiple of 32 falls back to F16 (as llama.cpp does);
* metadata: general.architecture "llama", general.file_type,
  general.quantization_version, llama.{vocab_size, context_length,
  embedding_length, block_count, feed_forward_length, rope.dimension_count,
  attention.head_count, attention.head_count_kv,
  attention.layer_norm_rms_epsilon, rope.freq_base};
* vocabulary: with a tokenizer.json (a SentencePiece-style BPE with byte
  fallback, as Llama-2 style models ship), its pieces as a llama SPM vocab
  (tokenizer.ggml.model "llama"); scores come from the merge ranks (the
  earlier the merge that builds a piece, the higher its score) so llama.cpp's
  SPM tokenizer merges in the same order. Without one, a synthetic SPM vocab of
  vocab_size pieces: <unk>, <s>, </s>, the 256 byte pieces <0x00>..<0xFF>,
  then distinct pieces "▁t<id>". bos/eos ids from config.json.

LoRA: adapter_config.json + adapter_model.safetensors into llama.cpp's adapter
GGUF (general.type "adapter", adapter.type "lora", adapter.lora.alpha,
tensors blk.N.<name>.weight.lora_a = PEFT lora_A [r, in] and .lora_b = PEFT
lora_B [out, r], with lora_B of q and k row-permuted as the base weights are).
llama.cpp scales a LoRA by alpha / r; for an rsLoRA adapter (use_rslora,
scale alpha / sqrt(r)) alpha is written as alpha * sqrt(r) so that the scale
comes out the same (llama.cpp's own converter ignores use_rslora).
Streaming: tensors are converted and written one at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from st_io import SafetensorsFile  # noqa: E402

OUTTYPES = {
    "f32": (QT.F32, FT.ALL_F32),
    "f16": (QT.F16, FT.MOSTLY_F16),
    "bf16": (QT.BF16, FT.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, FT.MOSTLY_Q8_0),
}

LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_MAP = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_base_name(hf_module: str) -> str | None:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q' (None: not a Llama tensor)."""
    if hf_module in GLOBAL_MAP:
        return GLOBAL_MAP[hf_module]
    m = LAYER_RE.match(hf_module)
    if m and m.group(2) in LAYER_MAP:
        return f"blk.{m.group(1)}.{LAYER_MAP[m.group(2)]}"
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half (HF) -> interleaved (llama.cpp) rotary order of the rows, per head."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Hparams:
    def __init__(self, model_dir: Path):
        c = json.loads((model_dir / "config.json").read_text())
        if c.get("model_type") not in ("llama", None) and "LlamaForCausalLM" not in c.get("architectures", []):
            raise SystemExit(f"{model_dir}: not a Llama checkpoint (model_type {c.get('model_type')!r})")
        self.raw = c
        self.vocab_size = c["vocab_size"]
        self.hidden = c["hidden_size"]
        self.ff = c["intermediate_size"]
        self.layers = c["num_hidden_layers"]
        self.n_head = c["num_attention_heads"]
        self.n_kv = c.get("num_key_value_heads") or self.n_head
        self.head_dim = c.get("head_dim") or self.hidden // self.n_head
        self.ctx = c.get("max_position_embeddings", 2048)
        self.eps = c.get("rms_norm_eps", 1e-5)
        self.theta = c.get("rope_theta", 10000.0)
        self.tied = c.get("tie_word_embeddings", False)
        self.rope_scaling = c.get("rope_scaling")
        bos, eos = c.get("bos_token_id", 1), c.get("eos_token_id", 2)
        self.bos = bos
        self.eos = eos[0] if isinstance(eos, list) else eos
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in ("linear", "default"):
            raise SystemExit(f"rope_scaling {self.rope_scaling} is not supported by this converter")

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_vocab_size(self.vocab_size)
        w.add_context_length(self.ctx)
        w.add_embedding_length(self.hidden)
        w.add_block_count(self.layers)
        w.add_feed_forward_length(self.ff)
        w.add_rope_dimension_count(self.head_dim)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_kv)
        w.add_layer_norm_rms_eps(self.eps)
        w.add_rope_freq_base(self.theta)
        if "head_dim" in self.raw:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(self.rope_scaling["factor"])


# ---------------------------------------------------------------- vocabulary

def spm_vocab_from_tokenizer_json(path: Path, vocab_size: int):
    t = json.loads(path.read_text(encoding="utf-8"))
    model = t["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback", False):
        raise SystemExit(f"{path}: only SentencePiece-style BPE with byte fallback is supported")
    vocab: dict[str, int] = model["vocab"]
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    scores = [-10000.0] * n
    # A piece's score: minus the rank of the first merge that builds it; pieces
    # no merge builds (single characters, bytes, specials) score 0.
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges", [])):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, r)
    for piece, i in vocab.items():
        tokens[i] = piece
        scores[i] = -float(rank[piece] + 1) if piece in rank else 0.0
        types[i] = gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) else gguf.TokenType.NORMAL
    unk = model.get("unk_token")
    for added in t.get("added_tokens", []):
        i = added["id"]
        tokens[i] = added["content"]
        scores[i] = 0.0
        if added["content"] == unk:
            types[i] = gguf.TokenType.UNKNOWN
        elif added.get("special", False):
            types[i] = gguf.TokenType.CONTROL
        else:
            types[i] = gguf.TokenType.USER_DEFINED
    unk_id = vocab.get(unk) if unk is not None else None
    return tokens, scores, types, unk_id


def synthetic_spm_vocab(vocab_size: int):
    if vocab_size < 259:
        raise SystemExit(f"a synthetic SPM vocab needs at least 259 pieces, not {vocab_size}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"\u2581t{i}")
        types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i))
    return tokens, scores, types, 0


def write_vocab(w: gguf.GGUFWriter, model_dir: Path, hp: Hparams) -> str:
    tok_json = model_dir / "tokenizer.json"
    if tok_json.is_file():
        tokens, scores, types, unk_id = spm_vocab_from_tokenizer_json(tok_json, hp.vocab_size)
        source = "tokenizer.json"
    else:
        tokens, scores, types, unk_id = synthetic_spm_vocab(hp.vocab_size)
        source = "synthetic"
    add_bos, add_eos = True, False
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        tc = json.loads(tok_cfg.read_text())
        add_bos = tc.get("add_bos_token", add_bos)
        add_eos = tc.get("add_eos_token", add_eos)
        if tc.get("add_prefix_space") is not None:
            w.add_add_space_prefix(tc["add_prefix_space"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(hp.bos)
    w.add_eos_token_id(hp.eos)
    if unk_id is not None:
        w.add_unk_token_id(unk_id)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    return f"{source}, {len(tokens)} pieces"


# ---------------------------------------------------------------- tensors

def out_type(name: str, shape: tuple[int, ...], want: QT) -> QT:
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return QT.F32
    if want == QT.Q8_0 and shape[-1] % 32:
        return QT.F16  # llama.cpp's QuantError fallback
    return want


def out_nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    n = int(np.prod(shape, dtype=np.int64))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return n // block * size


class StreamingWriter:
    """Declares every tensor first (name, shape, type), then writes them in order,
    each produced on demand, so that only one is in memory at a time."""

    def __init__(self, writer: gguf.GGUFWriter):
        self.w = writer
        self.plan: list[tuple[str, tuple[int, ...], QT, object]] = []

    def add(self, name: str, shape: tuple[int, ...], qtype: QT, produce) -> None:
        self.plan.append((name, shape, qtype, produce))
        self.w.add_tensor_info(name, shape, np.dtype(np.float32), out_nbytes(shape, qtype), raw_dtype=qtype)

    def write(self, verbose: bool) -> None:
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_ti_data_to_file()
        for name, shape, qtype, produce in self.plan:
            data = produce()
            assert tuple(data.shape) == tuple(shape), (name, data.shape, shape)
            q = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
            self.w.write_tensor_data(q)
            if verbose:
                print(f"  {name:32s} {qtype.name:5s} {{{', '.join(str(d) for d in reversed(shape))}}}")
        self.w.close()


def convert_model(args) -> None:
    model_dir = Path(args.model_dir)
    hp = Hparams(model_dir)
    want, ftype = OUTTYPES[args.outtype]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{model_dir}: no .safetensors files")
    sources = [SafetensorsFile(f) for f in files]
    where = {name: st for st in sources for name in st.names()}

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(args.name or model_dir.name)
    hp.write(w)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab_note = write_vocab(w, model_dir, hp)

    sw = StreamingWriter(w)
    counts: dict[str, int] = {}
    for hf_name, st in where.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if not hf_name.endswith(".weight"):
            raise SystemExit(f"unexpected tensor {hf_name}")
        base = gguf_base_name(hf_name[: -len(".weight")])
        if base is None:
            raise SystemExit(f"unexpected tensor {hf_name}")
        if base == "output" and hp.tied:
            continue  # llama.cpp reuses token_embd
        name = base + ".weight"
        shape = st.shape(hf_name)
        qtype = out_type(name, shape, want)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1

        def produce(st=st, hf_name=hf_name):
            x = st.f32(hf_name)
            if hf_name.endswith("self_attn.q_proj.weight"):
                x = permute_rows(x, hp.n_head)
            elif hf_name.endswith("self_attn.k_proj.weight"):
                x = permute_rows(x, hp.n_kv)
            return x

        sw.add(name, shape, qtype, produce)
    sw.write(args.verbose)
    print(f"wrote {args.out}: {len(sw.plan)} tensors {counts}, file type {ftype.name}, vocab {vocab_note}")


LORA_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def convert_lora(args) -> None:
    adapter_dir = Path(args.adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SystemExit(f"{adapter_dir}: peft_type {cfg.get('peft_type')} is not LORA")
    for unsupported in ("use_dora", "fan_in_fan_out"):
        if cfg.get(unsupported):
            raise SystemExit(f"{adapter_dir}: {unsupported} is not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise SystemExit(f"{adapter_dir}: rank_pattern / alpha_pattern are not supported")
    if cfg.get("modules_to_save"):
        raise SystemExit(f"{adapter_dir}: modules_to_save is not supported")
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(r)  # llama.cpp's alpha / r == PEFT's alpha / sqrt(r)
    base_dir = Path(args.base)
    hp = Hparams(base_dir)
    want, _ = OUTTYPES[args.outtype]
    st = SafetensorsFile(adapter_dir / "adapter_model.safetensors")

    pairs: dict[str, dict[str, str]] = {}
    for name in st.names():
        m = LORA_RE.match(name)
        if not m:
            raise SystemExit(f"unexpected adapter tensor {name} (only lora_A / lora_B of Linear layers)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = name

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_name(args.name or adapter_dir.name)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    sw = StreamingWriter(w)
    for module in sorted(pairs, key=lambda m: [int(p) if p.isdigit() else p for p in m.split(".")]):
        ab = pairs[module]
        if set(ab) != {"A", "B"}:
            raise SystemExit(f"{module}: needs both lora_A and lora_B")
        base = gguf_base_name(module)
        if base is None or base in ("token_embd", "output", "output_norm") or base.endswith("_norm"):
            raise SystemExit(f"{module}: LoRA on this module is not supported")
        a_shape, b_shape = st.shape(ab["A"]), st.shape(ab["B"])
        if a_shape[0] != r or b_shape[1] != r:
            raise SystemExit(f"{module}: rank {a_shape[0]}/{b_shape[1]} differs from r = {r}")
        n_perm = hp.n_head if module.endswith("q_proj") else hp.n_kv if module.endswith("k_proj") else None

        def produce_a(name=ab["A"]):
            return st.f32(name)

        def produce_b(name=ab["B"], n_perm=n_perm):
            x = st.f32(name)
            return permute_rows(x, n_perm) if n_perm else x

        sw.add(base + ".weight.lora_a", a_shape, out_type(base, a_shape, want), produce_a)
        sw.add(base + ".weight.lora_b", b_shape, out_type(base, b_shape, want), produce_b)
    sw.write(args.verbose)
    print(f"wrote {args.out}: {len(sw.plan) // 2} LoRA pairs, r {r}, adapter.lora.alpha {alpha:g}"
          f"{' (rsLoRA)' if cfg.get('use_rslora') else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="HF Llama checkpoint dir -> GGUF model")
    m.add_argument("model_dir")
    m.add_argument("out")
    m.add_argument("--outtype", default="f16", choices=sorted(OUTTYPES))
    m.add_argument("--name", default=None)
    m.add_argument("-v", "--verbose", action="store_true")
    lo = sub.add_parser("lora", help="PEFT LoRA adapter dir -> GGUF LoRA adapter")
    lo.add_argument("adapter_dir")
    lo.add_argument("out")
    lo.add_argument("--base", required=True, help="the base model's HF dir (its config.json is read)")
    lo.add_argument("--outtype", default="f32", choices=sorted(OUTTYPES))
    lo.add_argument("--name", default=None)
    lo.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    (convert_model if args.cmd == "model" else convert_lora)(args)


if __name__ == "__main__":
    main()
