#include "server/tokenizer/bpe_model.h"

#include <algorithm>
#include <functional>
#include <queue>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/tokenizer/utf8.h"

namespace loraserve::model::tokenizer_internal {

BpeModel::BpeModel(absl::flat_hash_map<std::string, int32_t> vocab, const Options& options)
    : vocab_(std::move(vocab)), options_(options) {
  // A map, not a vector: ids need not be dense, and a stray huge id in a
  // malformed file must not turn into a huge allocation.
  id_to_token_.reserve(vocab_.size());
  for (const auto& [token, id] : vocab_) {
    id_to_token_.emplace(id, token);
    end_id_ = std::max(end_id_, id + 1);
  }
  if (options_.unk_token.has_value()) unk_id_ = TokenToId(*options_.unk_token);
  for (int b = 0; b < 256; ++b) {
    byte_ids_[b] = TokenToId(absl::StrFormat("<0x%02X>", b)).value_or(-1);
  }
}

absl::Status BpeModel::AddMerge(const std::string& left, const std::string& right, int32_t rank) {
  const std::optional<int32_t> l = TokenToId(left), r = TokenToId(right),
                               merged = TokenToId(left + right);
  if (!l || !r || !merged) {
    return absl::InvalidArgumentError(absl::StrCat("merge #", rank, " (\"", left, "\", \"", right,
                                                   "\") uses a token outside the vocabulary"));
  }
  merges_.try_emplace(PairKey(*l, *r), rank, *merged);
  return absl::OkStatus();
}

std::optional<int32_t> BpeModel::TokenToId(const std::string& token) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  const auto it = id_to_token_.find(id);
  return it != id_to_token_.end() ? &it->second : nullptr;
}

void BpeModel::Tokenize(absl::string_view word, std::vector<int32_t>* ids) const {
  if (options_.ignore_merges) {
    if (const auto it = vocab_.find(word); it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  std::vector<Symbol> symbols = InitialSymbols(word);
  Merge(&symbols);
  for (const Symbol& s : symbols) {
    if (s.alive) ids->push_back(s.id);
  }
}

std::vector<BpeModel::Symbol> BpeModel::InitialSymbols(absl::string_view word) const {
  std::vector<int32_t> ids;
  bool pending_unk = false;
  const auto push_unk = [&] {
    if (pending_unk) ids.push_back(*unk_id_);
    pending_unk = false;
  };
  std::string character;
  for (size_t i = 0; i < word.size();) {
    const size_t length = NextUtf8(word, i).length;
    character = std::string(word.substr(i, length));
    i += length;
    if (const auto it = vocab_.find(character); it != vocab_.end()) {
      push_unk();
      ids.push_back(it->second);
      continue;
    }
    if (options_.byte_fallback && std::all_of(character.begin(), character.end(), [&](char c) {
          return byte_ids_[static_cast<unsigned char>(c)] >= 0;
        })) {
      push_unk();
      for (unsigned char c : character) ids.push_back(byte_ids_[c]);
      continue;
    }
    if (!unk_id_.has_value()) continue;
    if (!options_.fuse_unk) push_unk();
    pending_unk = true;
  }
  push_unk();
  std::vector<Symbol> symbols(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    symbols[i] = {ids[i], static_cast<int32_t>(i) - 1,
                  i + 1 < ids.size() ? static_cast<int32_t>(i + 1) : -1, true};
  }
  return symbols;
}

void BpeModel::Merge(std::vector<Symbol>* symbols) const {
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t merged_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  std::vector<Symbol>& s = *symbols;
  const auto consider = [&](int32_t pos) {
    if (pos < 0 || s[pos].next < 0) return;
    const auto it = merges_.find(PairKey(s[pos].id, s[s[pos].next].id));
    if (it != merges_.end()) queue.push({it->second.first, pos, it->second.second});
  };
  for (size_t i = 0; i + 1 < s.size(); ++i) consider(static_cast<int32_t>(i));
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = s[top.pos];
    if (!left.alive || left.next < 0) continue;
    // The pair may have changed since it was queued.
    const auto it = merges_.find(PairKey(left.id, s[left.next].id));
    if (it == merges_.end() || it->second.second != top.merged_id) continue;
    Symbol& right = s[left.next];
    left.id = top.merged_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) s[right.next].prev = top.pos;
    consider(left.prev);
    consider(top.pos);
  }
}

}  // namespace loraserve::model::tokenizer_internal
