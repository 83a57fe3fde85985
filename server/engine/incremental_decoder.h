// Streams text for generated tokens without ever emitting half a character.
// The text of the whole continuation equals
//   Decode(prompt + generated) minus Decode(prompt)
// (vLLM's convention), and the concatenation of all deltas equals it. Only
// the tokenizer's public interface is used (Decode, IsDroppedByDecode), so
// any Tokenizer streams the same way.
//
// Ownership and threading: borrows the tokenizer, which must outlive it. Not
// thread-safe; one per request (the engine keeps one per sequence).
//
// Example:
//   IncrementalDecoder decoder(*tokenizer, prompt_ids, /*skip_special_tokens=*/true);
//   for (int32_t id : generated) Send(decoder.Append(id));
//   Send(decoder.Flush());
#ifndef LORASERVE_SERVER_ENGINE_INCREMENTAL_DECODER_H_
#define LORASERVE_SERVER_ENGINE_INCREMENTAL_DECODER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "server/tokenizer/tokenizer.h"

namespace loraserve::engine {

class IncrementalDecoder {
 public:
  IncrementalDecoder(const model::Tokenizer& tokenizer, std::vector<int32_t> prompt_ids,
                     bool skip_special_tokens);
  // Adds one generated token; returns the text that became final with it
  // (possibly empty while a multi-byte character is incomplete).
  std::string Append(int32_t id);
  // At the end of the stream: the text still held back (an incomplete
  // character decodes to U+FFFD, as Decode of the whole sequence gives it).
  std::string Flush();
  // All text generated so far (the sum of the deltas returned).
  const std::string& text() const { return emitted_; }

 private:
  // The text after read_offset_ that is final; `at_end` emits even an
  // incomplete character.
  std::string Advance(bool at_end);

  const model::Tokenizer& tokenizer_;
  std::vector<int32_t> ids_;
  bool skip_special_tokens_;
  size_t prefix_offset_ = 0;  // start of the window re-decoded each step
  size_t read_offset_ = 0;    // ids before this are already emitted
  std::string emitted_;
};

}  // namespace loraserve::engine

#endif  // LORASERVE_SERVER_ENGINE_INCREMENTAL_DECODER_H_
