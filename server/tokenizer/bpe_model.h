// tokenizers' BPE model, private to server/tokenizer: the vocabulary, the
// ranked merges, and the encoding of one pre-tokenized word into ids.
//
// Thread-safety: filled once (constructor, AddMerge), then immutable;
// Tokenize may run on any thread.
#ifndef LORASERVE_SERVER_TOKENIZER_BPE_MODEL_H_
#define LORASERVE_SERVER_TOKENIZER_BPE_MODEL_H_

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace loraserve::model::tokenizer_internal {

class BpeModel {
 public:
  struct Options {
    std::optional<std::string> unk_token;
    bool fuse_unk = false;
    bool byte_fallback = false;
    bool ignore_merges = false;
  };

  BpeModel() = default;
  BpeModel(absl::flat_hash_map<std::string, int32_t> vocab, const Options& options);

  // A merge "left right" with the given rank; both parts and their
  // concatenation must be in the vocabulary.
  absl::Status AddMerge(const std::string& left, const std::string& right, int32_t rank);

  std::optional<int32_t> TokenToId(const std::string& token) const;
  const std::string* IdToToken(int32_t id) const;  // null outside the vocabulary
  int32_t end_id() const { return end_id_; }       // one past the largest id

  // Appends the ids of one pre-tokenized word.
  void Tokenize(absl::string_view word, std::vector<int32_t>* ids) const;

 private:
  // One element of the word being merged: a doubly linked list over a vector,
  // so that merging never moves anything.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };

  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  // One symbol per character; characters outside the vocabulary become their
  // byte tokens (byte_fallback) or the unknown token (runs fused with
  // fuse_unk), or vanish when there is no unknown token either — as in
  // tokenizers' BPE::merge_word.
  std::vector<Symbol> InitialSymbols(absl::string_view word) const;

  // Applies merges lowest rank first, leftmost first among equal ranks,
  // with a priority queue: O(n log n) in the word length.
  void Merge(std::vector<Symbol>* symbols) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  absl::flat_hash_map<int32_t, std::string> id_to_token_;
  int32_t end_id_ = 0;
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // → (rank, merged id)
  Options options_;
  std::optional<int32_t> unk_id_;
  std::array<int32_t, 256> byte_ids_{};  // "<0xXX>" token ids, -1 where absent
};

}  // namespace loraserve::model::tokenizer_internal

#endif  // LORASERVE_SERVER_TOKENIZER_BPE_MODEL_H_
