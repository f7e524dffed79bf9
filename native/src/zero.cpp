// Detection of all-zero data.
#include "zero.hpp"

#include <cstring>

namespace cloudfs_native {

bool all_zero(const uint8_t* p, size_t n) noexcept {
    // Whole 64-byte groups OR-ed together (vectorised by the compiler), with an
    // early exit per group so non-zero data is rejected after its first bytes.
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t w[8];
        std::memcpy(w, p + i, 64);
        if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return false;
    }
    uint8_t acc = 0;
    for (; i < n; ++i) acc |= p[i];
    return acc == 0;
}

}  // namespace cloudfs_native
