// A stable identity of a checkpoint, so a coordinator can refuse workers that loaded a
// different model: a hash of the config's shape fields and every tensor's name, dtype and shape.
#ifndef MOE_COMMON_FINGERPRINT_H_
#define MOE_COMMON_FINGERPRINT_H_

#include <string>
#include <vector>

#include "common/model_config.h"
#include "common/safetensors.h"

namespace moe {

// 16 hex digits; equal for the same config and tensor headers on every machine.
std::string ModelFingerprint(const ModelConfig& config, const TensorStore& store);
// The same over any list of tensor descriptions ("name:dims type", in a fixed order).
std::string ModelFingerprint(const ModelConfig& config, const std::vector<std::string>& tensors);

}  // namespace moe

#endif  // MOE_COMMON_FINGERPRINT_H_
