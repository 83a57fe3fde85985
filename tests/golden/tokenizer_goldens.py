#!/usr/bin/env python3
"""Tokenizer goldens for server/tokenizer/tokenizer_test.cc.

Usage (from the repository root, inside the reference environment of
tests/golden/requirements.txt; tests/golden/generate.py runs it this way):

    python tests/golden/tokenizer_goldens.py tests/golden/data/tokenizer --shared ../shared

  OUT_DIR       where the outputs go (tests/golden/data/tokenizer in the repo)
  --shared DIR  the shared data directory; its models/aidreams-260k is read

Outputs (all small and committed):
  OUT_DIR/bytelevel/tokenizer.json, tokenizer_config.json
      a byte-level BPE tokenizer (Llama-3 layout: Split regex + ByteLevel, ByteLevel
      decoder, BOS by TemplateProcessing) trained here with `tokenizers` on the corpus
      and the paragraphs below, plus added tokens exercising lstrip/rstrip/single_word;
  OUT_DIR/aidreams-260k.json, OUT_DIR/bytelevel.json
      for every string of tests/golden/tokenizer_corpus.json, as
      `transformers.AutoTokenizer` sees it: ids with and without special tokens, and
      decode(ids, skip_special_tokens=False/True) of the ids with special tokens;
      aidreams-260k.json also holds the model's greedy continuation of BOS;
  OUT_DIR/variants.json
      the same for the corpus strings of at most VARIANT_MAX_CHARS characters, for
      variants of the two tokenizers: JSON merge patches (RFC 7396) applied to
      tokenizer.json and tokenizer_config.json (legacy=false, the file read as is with
      its Prepend/Replace normalizer, Metaspace splitting, GPT-2 and Qwen2 regexes, ...).
Every output names the library versions that produced it.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import tokenizers
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

CORPUS = Path(__file__).resolve().parent / "tokenizer_corpus.json"

# Llama-3's pre-tokenizer regex (tokenizer.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TRAINING_PARAGRAPHS = [
    "Echoes of vectors unfold, a gentle hum of precision. The machine dreams of light and "
    "numbers, of quiet rooms where the weights of a model settle like dust in the morning sun.",
    "A server keeps one frozen base model in memory and serves many small adapters on top of "
    "it. Each request names its adapter; one batch mixes the requests of many adapters, and "
    "nothing of the base model moves when an adapter is swapped in or out.",
    "The tokenizer splits text into pieces, maps every byte to a printable character and "
    "merges the most frequent pairs first. Numbers are cut into groups of at most three "
    "digits, so 1234567 becomes 123, 456 and 7, while words keep their leading space.",
    "def encode(text):\n    ids = []\n    for word in split(text):\n        ids.extend(bpe(word))\n"
    "    return ids\n",
    "Don't worry, it's fine: we'll see what they're doing, and I'm sure you've read it. "
    "She'd say the weather in Zürich was cold, and the café near the station was closed.",
    "中文文本的分词测试。日本語のテキストも少し。한국어 문장도 있습니다。😀 emoji 🎉 too.",
]

SPECIAL_TOKENS = [
    # The Llama-3 pair of BOS/EOS and the chat turn end (rstrip: eats the spaces after it).
    AddedToken("<|begin_of_text|>", special=True, normalized=False),
    AddedToken("<|end_of_text|>", special=True, normalized=False),
    AddedToken("<|eot_id|>", special=True, normalized=False, rstrip=True),
    # Like RoBERTa's mask token: takes the spaces before it.
    AddedToken("<mask>", special=True, normalized=False, lstrip=True),
]
# A plain (non-special) added token matched on normalized text, whole words only.
PLAIN_TOKENS = [AddedToken("[TOOL]", special=False, normalized=True, single_word=True)]

QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
AS_IS = {"tokenizer_class": "PreTrainedTokenizerFast"}  # transformers reads tokenizer.json unchanged
METASPACE = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}

# name: (base tokenizer, tokenizer.json patch, tokenizer_config.json patch)
VARIANTS = {
    "shared-legacy-false": ("aidreams-260k", {}, {"legacy": False}),
    "shared-no-prefix-space": ("aidreams-260k", {}, {"add_prefix_space": False}),
    "shared-as-is": ("aidreams-260k", {}, AS_IS),
    "shared-metaspace-split": ("aidreams-260k", {"normalizer": None, "pre_tokenizer": METASPACE,
                                                 "decoder": METASPACE}, AS_IS),
    "shared-eos-template": ("aidreams-260k", {"post_processor": {
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}}, AS_IS),
    "bytelevel-gpt2": ("bytelevel", {"pre_tokenizer": {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}}, {}),
    "bytelevel-gpt2-prefix-space": ("bytelevel", {"pre_tokenizer": {
        "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}}, {}),
    "bytelevel-qwen2": ("bytelevel", {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}}, {}),
    "bytelevel-ignore-merges": ("bytelevel", {"model": {"ignore_merges": True}}, {}),
}
VARIANT_MAX_CHARS = 80

CHAT_TEMPLATE = (
    "{% for m in messages %}<|begin_of_text|>{{ m['role'] }}: {{ m['content'] }}<|eot_id|>"
    "{% endfor %}"
)


def versions():
    return {"python": sys.version.split()[0], "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__}


def build_bytelevel(out_dir: Path, corpus):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_PARAGRAPHS * 4 + corpus, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(PLAIN_TOKENS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def cases(tokenizer, corpus):
    out = []
    for text in corpus:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        out.append({
            "text": text,
            "ids": ids,
            "ids_no_special": tokenizer(text, add_special_tokens=False)["input_ids"],
            "decoded": tokenizer.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tokenizer.decode(ids, skip_special_tokens=True),
        })
    return out


def write_goldens(path: Path, name: str, tokenizer, corpus, extra=None):
    doc = {"tokenizer": name, "versions": versions(), "vocab_size": len(tokenizer),
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    doc.update(extra or {})
    # One case per line: readable diffs, small files.
    lines = [json.dumps(case, ensure_ascii=False) for case in cases(tokenizer, corpus)]
    head = json.dumps(doc, ensure_ascii=False, indent=1)[:-2]
    path.write_text(head + ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n")
    size = path.stat().st_size
    assert size < 1 << 20, f"{path} is {size} bytes; keep goldens under 1 MiB"


def merge_patch(target, patch):
    """RFC 7396, as nlohmann::json::merge_patch applies it in tokenizer_test.cc."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def write_variants(path: Path, bases, corpus, work_dir: Path):
    short = [text for text in corpus if len(text) <= VARIANT_MAX_CHARS]
    variants = []
    for name, (base, tokenizer_patch, config_patch) in VARIANTS.items():
        directory = work_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        for file, patch in (("tokenizer.json", tokenizer_patch), ("tokenizer_config.json", config_patch)):
            original = json.loads((bases[base] / file).read_text())
            (directory / file).write_text(json.dumps(merge_patch(original, patch), ensure_ascii=False))
        lines = [json.dumps(case, ensure_ascii=False)
                 for case in cases(AutoTokenizer.from_pretrained(directory), short)]
        head = json.dumps({"name": name, "base": base, "tokenizer_patch": tokenizer_patch,
                           "config_patch": config_patch}, ensure_ascii=False)[:-1]
        variants.append(head + ',\n   "cases": [\n    ' + ",\n    ".join(lines) + "\n   ]}")
    doc = json.dumps({"versions": versions(), "max_chars": VARIANT_MAX_CHARS}, indent=1)[:-2]
    path.write_text(doc + ',\n "variants": [\n  ' + ",\n  ".join(variants) + "\n ]\n}\n")
    size = path.stat().st_size
    assert size < 1 << 20, f"{path} is {size} bytes; keep goldens under 1 MiB"


def greedy_continuation(model_dir: Path, tokenizer, new_tokens=40):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = torch.tensor([[tokenizer.bos_token_id]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    ids = out[0].tolist()
    return {"greedy_ids": ids, "greedy_text": tokenizer.decode(ids, skip_special_tokens=True)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shared", type=Path, required=True)
    args = parser.parse_args()
    corpus = json.loads(CORPUS.read_text())["strings"]
    args.out_dir.mkdir(parents=True, exist_ok=True)

    shared_model = args.shared / "models" / "aidreams-260k"
    shared_tok = AutoTokenizer.from_pretrained(shared_model)
    write_goldens(args.out_dir / "aidreams-260k.json", "aidreams-260k", shared_tok, corpus,
                  greedy_continuation(shared_model, shared_tok))

    bytelevel_dir = args.out_dir / "bytelevel"
    build_bytelevel(bytelevel_dir, corpus)
    write_goldens(args.out_dir / "bytelevel.json", "bytelevel", AutoTokenizer.from_pretrained(bytelevel_dir),
                  corpus)

    with tempfile.TemporaryDirectory() as work_dir:
        write_variants(args.out_dir / "variants.json",
                       {"aidreams-260k": shared_model, "bytelevel": bytelevel_dir}, corpus, Path(work_dir))


if __name__ == "__main__":
    main()
