// Early launch (programmatic dependent launch, sm_90+): a kernel may start while the kernel before it on the
// stream finishes, and waits (griddepcontrol.wait) before touching memory that kernel writes. On by default;
// HF_INT4_EARLY_LAUNCH=0 in the environment turns it off for every kernel of both extensions (A/B timing).
#pragma once

#include <cstdlib>

namespace hf_int4 {

inline bool early_launch_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("HF_INT4_EARLY_LAUNCH");
    return v == nullptr || v[0] != '0';
  }();
  return enabled;
}

}  // namespace hf_int4
