// One decoder layer's weights on the backend, as LlamaModel holds them:
// private to server/model (the forward pass in llama_model.cc reads them, the
// loader in llama_weights.cc fills them).
#ifndef LORASERVE_SERVER_MODEL_LLAMA_LAYER_H_
#define LORASERVE_SERVER_MODEL_LLAMA_LAYER_H_

#include "kernels/backend.h"
#include "server/model/llama_model.h"

namespace loraserve::model {

struct LlamaModel::Layer {
  const float* input_norm = nullptr;           // [hidden]
  const float* post_attention_norm = nullptr;  // [hidden]
  // q, k and v share one GEMM: [q_dim + 2 * kv_dim, hidden], q rows, then k,
  // then v (q_dim = heads * head_dim, kv_dim = kv_heads * head_dim).
  kernels::WeightView qkv;
  const float* qkv_bias = nullptr;  // [q_dim + 2 * kv_dim], stacked likewise, or null
  kernels::WeightView o;            // [hidden, q_dim]
  kernels::WeightView gate_up;      // [2 * intermediate, hidden]: gate rows, then up
  kernels::WeightView down;         // [hidden, intermediate]
};

}  // namespace loraserve::model

#endif  // LORASERVE_SERVER_MODEL_LLAMA_LAYER_H_
