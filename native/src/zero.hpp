// Detection of all-zero data: such blocks are holes and are never stored.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cloudfs_native {

// True when all n bytes are zero (n == 0 included).
bool all_zero(const uint8_t* p, size_t n) noexcept;

}  // namespace cloudfs_native
