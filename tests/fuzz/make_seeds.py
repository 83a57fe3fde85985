#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (tests/fuzz/corpus/TARGET/) from real files.

Sources: the shared test model and adapters (../shared), the goldens' models, adapters and
byte-level tokenizer (tests/golden/data), the request bodies of README.md and the e2e tests.
Files over ~100 KB are cut down to a few of their tensors (or tokens), still well-formed. The
output is committed; rerun this after changing an input format, then commit the result.

Usage: tests/fuzz/make_seeds.py [SHARED_DIR]   (default: the repository's ../shared)
"""
import glob
import hashlib
import json
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SHARED = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "..", "shared")
GOLDEN = os.path.join(ROOT, "tests", "golden", "data")
MODEL = os.path.join(SHARED, "models", "aidreams-260k")
ADAPTERS = sorted(glob.glob(os.path.join(SHARED, "adapters", "aidreams-260k", "*")))
GOLDEN_ADAPTERS = sorted(glob.glob(os.path.join(GOLDEN, "adapters", "*")))
MAX_SEED = 100_000
PART = b"\n--part--\n"  # checkpoint_fuzz.cc kSeparator
FORM_PART = b"\r\n--part\r\n"  # upload_form_fuzz.cc kSeparator


def read(path):
    with open(path, "rb") as f:
        return f.read()


def parse_safetensors(data):
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    return header, data[8 + n :]


def serialize_safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)] -> safetensors bytes (header padded to 8)."""
    header, body, offset = {}, b"", 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        body += raw
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + body


def tensors_of(data, budget=MAX_SEED - 4096):
    """Tensors of a safetensors file in data order, each that still fits in `budget` bytes."""
    header, body = parse_safetensors(data)
    metadata = header.pop("__metadata__", None)
    out, used = [], 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        if used + end - begin > budget:
            continue  # a smaller one may still fit
        out.append((name, info["dtype"], info["shape"], body[begin:end]))
        used += end - begin
    return out, metadata


def small_safetensors(path, budget=16_000):
    """The file, or when larger than `budget` its first tensors (a fuzzer's mutations of the
    data bytes find nothing: the header is what is parsed)."""
    data = read(path)
    if len(data) <= budget:
        return data
    tensors, metadata = tensors_of(data, budget)
    return serialize_safetensors(tensors, metadata)


class Corpus:
    def __init__(self, target):
        self.dir = os.path.join(HERE, "corpus", target)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)

    def add(self, name, data):
        if isinstance(data, str):
            data = data.encode()
        assert len(data) <= MAX_SEED + 8192, (self.dir, name, len(data))
        with open(os.path.join(self.dir, name), "wb") as f:
            f.write(data)


def safetensors_seeds():
    c = Corpus("safetensors")
    for d in ADAPTERS + GOLDEN_ADAPTERS:
        c.add(os.path.basename(d) + ".safetensors", small_safetensors(os.path.join(d, "adapter_model.safetensors")))
    c.add("model-cut.safetensors", small_safetensors(os.path.join(MODEL, "model.safetensors")))
    # One whole real file (85 KB) is a seed too: run.sh reads it from ../shared
    # (tests/fuzz/shared_seeds/safetensors), it is not copied here.
    # Every dtype of the format once, metadata, an empty tensor, an I32 tensor.
    c.add("dtypes.safetensors", serialize_safetensors(
        [(f"t_{dt}", dt, [2], b"\x01" * (2 * size)) for dt, size in
         [("F32", 4), ("F16", 2), ("BF16", 2), ("F64", 8), ("I64", 8), ("U64", 8), ("I32", 4),
          ("U32", 4), ("I16", 2), ("U16", 2), ("I8", 1), ("U8", 1), ("BOOL", 1),
          ("F8_E4M3", 1), ("F8_E5M2", 1)]] + [("empty", "F32", [0, 3], b"")],
        {"format": "pt", "note": "seed"}))
    c.add("empty-header.safetensors", serialize_safetensors([]))


def checkpoint_seeds():
    c = Corpus("checkpoint")
    sharded = os.path.join(GOLDEN, "models", "sharded")
    index = json.loads(read(os.path.join(sharded, "model.safetensors.index.json")))
    old_shards = sorted(set(index["weight_map"].values()))[:3]
    n = len(old_shards)
    parts, weight_map = [], {}
    for i, old in enumerate(old_shards, 1):
        tensors, _ = tensors_of(read(os.path.join(sharded, old)), budget=12_000)
        new = f"model-0000{i}-of-0000{n}.safetensors"
        for name, *_ in tensors:
            weight_map[name] = new
        parts.append(serialize_safetensors(tensors))
    new_index = json.dumps({"metadata": index.get("metadata", {}), "weight_map": weight_map}, indent=2)
    c.add("sharded-3", PART.join([new_index.encode()] + parts))
    c.add("single", PART.join([b"", read(os.path.join(SHARED, "adapters", "aidreams-260k", "qv-r4", "adapter_model.safetensors"))]))
    c.add("single-model", PART.join([b"", small_safetensors(os.path.join(MODEL, "model.safetensors"))]))


def model_config_seeds():
    c = Corpus("model_config")
    c.add("aidreams-260k.json", read(os.path.join(MODEL, "config.json")))
    c.add("aidreams-260k-with-generation.json",
          read(os.path.join(MODEL, "config.json")) + b"\0" + read(os.path.join(MODEL, "generation_config.json")))
    for d in sorted(glob.glob(os.path.join(GOLDEN, "models", "*"))):
        name = os.path.basename(d)
        c.add(name + ".json", read(os.path.join(d, "config.json")))
        generation = os.path.join(d, "generation_config.json")
        if name in ("gqa", "qwen2") and os.path.exists(generation):
            c.add(name + "-with-generation.json", read(os.path.join(d, "config.json")) + b"\0" + read(generation))


def peft_config_seeds():
    c = Corpus("peft_config")
    for d in ADAPTERS + GOLDEN_ADAPTERS:
        c.add(os.path.basename(d) + ".json", read(os.path.join(d, "adapter_config.json")))
    # With module names of other models after the config.
    c.add("qv-r4-with-modules.json", read(os.path.join(SHARED, "adapters", "aidreams-260k", "qv-r4", "adapter_config.json")) +
          b"\0model.layers.7.self_attn.q_proj\0transformer.h.2.attn.c_attn\0model.layers.2.block_sparse_moe.experts.3.w1")


def reduced_tokenizer(path, keep):
    """The tokenizer.json at `path` with its BPE vocabulary cut to ids < keep (merges to match)."""
    tok = json.loads(read(path))
    model = tok["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < keep}
    model["vocab"] = vocab
    model["merges"] = [m for m in model["merges"]
                       if (m if isinstance(m, list) else m.split(" "))[0] in vocab
                       and (m if isinstance(m, list) else m.split(" "))[1] in vocab
                       and "".join(m if isinstance(m, list) else m.split(" ")) in vocab]
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < keep or t["special"]]
    return json.dumps(tok, ensure_ascii=False).encode()


def tokenizer_load_seeds():
    c = Corpus("tokenizer_load")
    shared_config = read(os.path.join(MODEL, "tokenizer_config.json"))
    bytelevel = os.path.join(GOLDEN, "tokenizer", "bytelevel")
    bytelevel_config = read(os.path.join(bytelevel, "tokenizer_config.json"))
    c.add("aidreams-260k", read(os.path.join(MODEL, "tokenizer.json")) + b"\0" + shared_config)
    # The shared tokenizer.json alone is a seed too: run.sh reads it from ../shared
    # (tests/fuzz/shared_seeds/tokenizer_load).
    c.add("aidreams-260k-cut", reduced_tokenizer(os.path.join(MODEL, "tokenizer.json"), 300) + b"\0" + shared_config)
    c.add("bytelevel-cut", reduced_tokenizer(os.path.join(bytelevel, "tokenizer.json"), 400) + b"\0" + bytelevel_config)
    # Hand-written: the smallest tokenizers of each family.
    c.add("tiny-sentencepiece", json.dumps({
        "version": "1.0",
        "added_tokens": [{"id": 0, "content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True},
                         {"id": 1, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                          {"type": "Replace", "pattern": {"String": " "},
                                                           "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"},
                                                     {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True,
                  "vocab": {"<unk>": 0, "<s>": 1, "<0x0A>": 2, "<0xC3>": 3, "<0xA9>": 4, "\u2581": 5, "a": 6,
                            "b": 7, "ab": 8, "\u2581ab": 9},
                  "merges": [["a", "b"], ["\u2581", "ab"]]},
    }, ensure_ascii=False) + "\0" + json.dumps({"tokenizer_class": "LlamaTokenizerFast", "legacy": False,
                                                 "add_prefix_space": True, "bos_token": "<s>"}))
    c.add("tiny-bytelevel", json.dumps({
        "version": "1.0",
        "added_tokens": [{"id": 5, "content": "<|end|>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{L}+| ?\\p{N}|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "unk_token": None, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {"a": 0, "b": 1, "\u0120": 2, "ab": 3, "\u0120ab": 4},
                  "merges": ["a b", "\u0120 ab"]},
    }, ensure_ascii=False) + "\0" + json.dumps({"eos_token": "<|end|>", "chat_template": "<|im_start|>"}))


def tokenizer_encode_seeds():
    c = Corpus("tokenizer_encode")
    texts = []
    for name in ("aidreams-260k", "bytelevel"):
        cases = json.loads(read(os.path.join(GOLDEN, "tokenizer", name + ".json")))["cases"]
        texts += [case["text"] for case in cases[::9]]
    texts += ["Once upon a time", "The robot", "<s>Hi</s> [INST] x [/INST]", "<|begin_of_text|>hi<|eot_id|>"]
    for i, text in enumerate(texts):
        flags = (i & 7) | ((i % 5) << 3)  # both tokenizers, both special-token settings, a few prompt cuts
        c.add(f"text-{i:03d}", bytes([flags]) + text.encode())


def chat_template_seeds():
    c = Corpus("chat_template")
    chat = b"\0system\0Answer briefly.\0user\0What is LoRA?\0assistant\0Low-rank adaptation.\0user\0More?"
    c.add("aidreams-260k", read(os.path.join(MODEL, "tokenizer_config.json")) + chat)
    c.add("bytelevel", read(os.path.join(GOLDEN, "tokenizer", "bytelevel", "tokenizer_config.json")) + chat)
    # The families' markers, as their official templates write them (chat_template.h).
    templates = {
        "llama-2": "{% if message['role'] == 'system' %}<<SYS>>\\n{{ m }}\\n<</SYS>>{% endif %}[INST] {{ c }} [/INST]",
        "llama-3": "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}",
        "chatml": "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'}}",
        "mistral": "{{- ' [INST] ' + message['content'] + ' [/INST]' }}",
    }
    for name, jinja in templates.items():
        c.add(f"{name}-string", json.dumps({"chat_template": jinja}).encode() + chat)
    c.add("list-default", json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                        {"name": "default", "template": templates["chatml"]}]}).encode() + chat)
    for name in ("llama-2", "qwen", "mistral"):
        c.add(f"name-{name}", name.encode() + chat)


def request_seeds():
    completions = [
        {"model": "ocean", "prompt": "", "max_tokens": 24, "temperature": 0},
        {"model": "aidreams-260k", "prompt": "The robot", "stream": True, "max_tokens": 24},
        {"model": "robot", "prompt": ["Once", "The sea"], "n": 2, "logprobs": 3, "seed": 42, "stop": ["\n", "."],
         "stream_options": {"include_usage": True}, "top_p": 0.9, "top_k": 40, "user": "u"},
        {"model": "m", "prompt": [1, 2, 3], "stop_token_ids": [2], "ignore_eos": True, "best_of": 1,
         "presence_penalty": 0, "frequency_penalty": 0, "echo": False, "suffix": "", "logit_bias": {},
         "response_format": {"type": "text"}, "adapter_scale": 0.5},
        {"model": "m", "prompt": [[1, 2], [3]], "max_tokens": None, "seed": -1},
    ]
    c = Corpus("completion_request")
    for i, body in enumerate(completions):
        c.add(f"completion-{i}.json", json.dumps(body))
    for body in ['{"model": "ocean", "prompt": "hi", "n": 1000}', '{"model": "ocean", "prompt": 7}',
                 '{"model": "ocean", "prompt": "hi", "max_tokens": 5',
                 '{"lora_name": "sea", "lora_path": "../shared/adapters/aidreams-260k/ocean"}']:
        c.add("body-" + hashlib.sha256(body.encode()).hexdigest()[:12] + ".json", body)
    chats = [
        {"model": "ocean", "messages": [{"role": "system", "content": "You tell short stories."},
                                        {"role": "user", "content": "A story about the sea."}], "max_tokens": 24},
        {"model": "robot", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                     {"type": "text", "text": " there"}]},
                                        {"role": "assistant", "content": "Hello"},
                                        {"role": "user", "content": "Bye", "name": "me"}],
         "logprobs": True, "top_logprobs": 2, "max_completion_tokens": 8, "stream": True, "n": 3},
        {"model": "m", "messages": [{"role": "assistant", "content": "odd first"}], "temperature": 2},
    ]
    c = Corpus("chat_request")
    for i, body in enumerate(chats):
        c.add(f"chat-{i}.json", json.dumps(body))


def upload_seeds():
    c = Corpus("upload_form")
    small = [d for d in ADAPTERS + GOLDEN_ADAPTERS if os.path.getsize(os.path.join(d, "adapter_model.safetensors")) < 40_000]
    for d in small:
        name = os.path.basename(d)
        fields = [b"name\n" + name.encode(),
                  b"adapter_config.json\n" + read(os.path.join(d, "adapter_config.json")),
                  b"adapter_model.safetensors\n" + small_safetensors(os.path.join(d, "adapter_model.safetensors"))]
        c.add(f"acme-{name}", FORM_PART.join([b"acme"] + fields))
        c.add(f"admin-{name}-replace", FORM_PART.join([b"admin"] + fields + [b"replace\ntrue"]))
    c.add("acme-other-tenant", FORM_PART.join([b"acme", b"name\nglobex/x", b"adapter_config.json\n{}",
                                               b"adapter_model.safetensors\n" + serialize_safetensors([])]))

    c = Corpus("upload_stream")

    def record(tag, payload):
        return bytes([tag]) + struct.pack("<H", len(payload)) + payload

    def varint(n):
        out = b""
        while True:
            byte = n & 0x7F
            n >>= 7
            if n:
                out += bytes([byte | 0x80])
            else:
                return out + bytes([byte])

    def field(number, payload):  # a length-delimited protobuf field
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    for d in small:
        name = os.path.basename(d).encode()
        tensors = small_safetensors(os.path.join(d, "adapter_model.safetensors"))
        config = read(os.path.join(d, "adapter_config.json"))
        third = len(tensors) // 3 + 1
        chunks = [tensors[i : i + third] for i in range(0, len(tensors), third)]
        # Built headers (tag 1: sizes and digest of the chunks), chunks (tag 2), the last marked.
        c.add(f"built-{name.decode()}", record(1 | 16, b"acme/" + name) + b"".join(
            record(2 | (4 if i == len(chunks) - 1 else 0), chunk) for i, chunk in enumerate(chunks)))
        # The same stream as protobuf messages (tag 0), as a client sends it.
        header = (field(1, b"acme/" + name) + field(2, config) +
                  field(3, hashlib.sha256(tensors).hexdigest().encode()) + b"\x20" + varint(len(tensors)))
        messages = [field(1, header)]
        for i, chunk in enumerate(chunks):
            body = field(1, chunk) + (b"\x10\x01" if i == len(chunks) - 1 else b"")
            messages.append(field(2, body))
        stream = b"".join(record(0, m) for m in messages)
        if len(stream) <= MAX_SEED:
            c.add(f"proto-{name.decode()}", stream)
    c.add("no-header", record(2, b"abc") + record(3, b""))
    c.add("twice", record(1, b"x") + record(1, b"x") + record(2, b"ab"))


if __name__ == "__main__":
    safetensors_seeds()
    checkpoint_seeds()
    model_config_seeds()
    peft_config_seeds()
    tokenizer_load_seeds()
    tokenizer_encode_seeds()
    chat_template_seeds()
    request_seeds()
    upload_seeds()
    for d in sorted(glob.glob(os.path.join(HERE, "corpus", "*"))):
        files = os.listdir(d)
        print(f"{os.path.basename(d)}: {len(files)} seeds, "
              f"{sum(os.path.getsize(os.path.join(d, f)) for f in files) // 1024} KB")
