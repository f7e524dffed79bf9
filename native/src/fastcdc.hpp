// FastCDC normalized content-defined chunking (Xia et al., USENIX ATC 2016 and
// IEEE TPDS 2020), normalization level 2, as a streaming state machine.
//
// The chunker never holds data: its whole state is the length of the chunk in
// progress and the rolling gear fingerprint, so a file can be fed in buffers of
// any size and the cut points are exactly those of one pass over the whole file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace cloudfs_native {

// Limits checked by cdc_params_error(); the Python layer raises ValueError on them.
constexpr uint64_t kCdcMaxChunk = uint64_t{1} << 30;  // 1 GiB: bits <= 30 keeps masks inside 64 bits
constexpr uint64_t kCdcMinAvg = 8;                     // avg >= 8 so mask_l has at least one bit

// Returns nullptr when (min, avg, max) is usable, else a message saying why not.
const char* cdc_params_error(uint64_t min_size, uint64_t avg_size, uint64_t max_size) noexcept;

// round(log2(avg)) computed exactly in integers (no floating-point rounding edge).
unsigned cdc_avg_bits(uint64_t avg_size) noexcept;

// A mask of `ones` one-bits in the top bits of a 64-bit word.  Top bits are used
// (not the paper's spread-out padded masks) because bit k of the gear fingerprint
// depends on the last k+1 bytes only: the top bits see the whole 64-byte window.
uint64_t cdc_top_mask(unsigned ones) noexcept;

class FastCdc {
public:
    // gear: 256 words, copied.  Parameters must pass cdc_params_error().
    FastCdc(const uint64_t* gear, uint64_t min_size, uint64_t avg_size, uint64_t max_size) noexcept;

    // Consume data[0, n) and append the lengths of the chunks it completes to `cuts`.
    void feed(const uint8_t* data, size_t n, std::vector<uint64_t>& cuts);

    // Length of the unfinished trailing chunk; the chunker is reset afterwards.
    uint64_t finish() noexcept;

    void reset() noexcept { pos_ = 0; fp_ = 0; }

    uint64_t mask_s() const noexcept { return mask_s_; }
    uint64_t mask_l() const noexcept { return mask_l_; }

private:
    uint64_t gear_[256];
    uint64_t min_, avg_, max_;
    uint64_t mask_s_, mask_l_;
    // Bytes of the current chunk before which the fingerprint need not be computed:
    // fp only depends on the last 64 bytes and no cut is tested before min_size.
    uint64_t warm_;
    uint64_t pos_ = 0;  // length of the chunk in progress
    uint64_t fp_ = 0;   // gear fingerprint of the chunk in progress
};

}  // namespace cloudfs_native
