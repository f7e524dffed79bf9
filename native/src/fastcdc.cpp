// FastCDC normalized chunking: see fastcdc.hpp for the state model.
//
// Definition (what the Python reference in tests/unit/test_native.py implements):
// a chunk starts with fp = 0; for its j-th byte b (length L = j+1 afterwards)
//     fp = (fp << 1) + gear[b]                       (mod 2^64)
// and the chunk ends after that byte when
//     L == max_size, or
//     min_size <= L < avg_size and (fp & mask_s) == 0, or
//     avg_size <= L < max_size and (fp & mask_l) == 0.
// The byte whose fingerprint matches belongs to the chunk it ends.
#include "fastcdc.hpp"

#include <algorithm>
#include <cstring>

namespace cloudfs_native {

const char* cdc_params_error(uint64_t min_size, uint64_t avg_size, uint64_t max_size) noexcept {
    if (min_size < 1) return "min_size must be at least 1";
    if (avg_size < kCdcMinAvg) return "avg_size must be at least 8";
    if (!(min_size <= avg_size && avg_size <= max_size))
        return "chunk sizes must satisfy min_size <= avg_size <= max_size";
    if (max_size > kCdcMaxChunk) return "max_size must be at most 1 GiB";
    return nullptr;
}

unsigned cdc_avg_bits(uint64_t avg) noexcept {
    unsigned k = 63 - static_cast<unsigned>(__builtin_clzll(avg));  // floor(log2(avg))
    // log2(avg) >= k + 1/2  <=>  avg^2 >= 2^(2k+1); avg <= 2^30 so avg^2 fits.
    return (avg * avg >= (uint64_t{1} << (2 * k + 1))) ? k + 1 : k;
}

uint64_t cdc_top_mask(unsigned ones) noexcept {
    if (ones == 0) return 0;
    if (ones >= 64) return ~uint64_t{0};
    return ~uint64_t{0} << (64 - ones);
}

FastCdc::FastCdc(const uint64_t* gear, uint64_t min_size, uint64_t avg_size, uint64_t max_size) noexcept
    : min_(min_size), avg_(avg_size), max_(max_size) {
    std::memcpy(gear_, gear, sizeof gear_);
    unsigned bits = cdc_avg_bits(avg_size);
    mask_s_ = cdc_top_mask(bits + 2);  // harder to match below avg: fewer small chunks
    mask_l_ = cdc_top_mask(bits - 2);  // easier to match above avg: fewer forced cuts
    warm_ = min_ > 64 ? min_ - 64 : 0;
}

namespace {

// Hash p[0, n) into fp without testing.
inline uint64_t roll(const uint64_t* gear, const uint8_t* p, size_t n, uint64_t fp) noexcept {
    for (size_t i = 0; i < n; ++i) fp = (fp << 1) + gear[p[i]];
    return fp;
}

// Hash p[0, n) into fp, testing each byte; returns the number of bytes up to and
// including the first matching one, or 0 when none matches (fp then covers all n).
// Unrolled by four with the tests merged into one branch: matches are rare
// (one per ~avg bytes), so the common path is four loads, four shift-adds, one branch.
inline size_t scan(const uint64_t* gear, const uint8_t* p, size_t n, uint64_t& fp_io,
                   uint64_t mask) noexcept {
    uint64_t fp = fp_io;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        uint64_t f0 = (fp << 1) + gear[p[i]];
        uint64_t f1 = (f0 << 1) + gear[p[i + 1]];
        uint64_t f2 = (f1 << 1) + gear[p[i + 2]];
        uint64_t f3 = (f2 << 1) + gear[p[i + 3]];
        if (__builtin_expect(((f0 & mask) == 0) | ((f1 & mask) == 0) | ((f2 & mask) == 0) |
                                 ((f3 & mask) == 0),
                             0)) {
            if ((f0 & mask) == 0) { fp_io = f0; return i + 1; }
            if ((f1 & mask) == 0) { fp_io = f1; return i + 2; }
            if ((f2 & mask) == 0) { fp_io = f2; return i + 3; }
            fp_io = f3;
            return i + 4;
        }
        fp = f3;
    }
    for (; i < n; ++i) {
        fp = (fp << 1) + gear[p[i]];
        if ((fp & mask) == 0) { fp_io = fp; return i + 1; }
    }
    fp_io = fp;
    return 0;
}

}  // namespace

void FastCdc::feed(const uint8_t* data, size_t n, std::vector<uint64_t>& cuts) {
    size_t i = 0;
    while (i < n) {
        const size_t left = n - i;
        // Each phase handles the bytes whose resulting length L = pos_ + 1 falls in
        // one range of the definition above; a phase may stop at the buffer's end.
        if (pos_ < warm_) {
            // L <= min - 64: no test, and these bytes drop out of fp before any test.
            size_t take = static_cast<size_t>(std::min<uint64_t>(left, warm_ - pos_));
            pos_ += take;
            i += take;
            fp_ = 0;
            continue;
        }
        if (pos_ + 1 < min_) {
            // L < min: hash only.
            size_t take = static_cast<size_t>(std::min<uint64_t>(left, min_ - 1 - pos_));
            fp_ = roll(gear_, data + i, take, fp_);
            pos_ += take;
            i += take;
            continue;
        }
        uint64_t mask;
        uint64_t phase_end;  // pos_ value at which this phase ends
        if (pos_ + 1 < avg_) {
            mask = mask_s_;
            phase_end = avg_ - 1;
        } else if (pos_ + 1 < max_) {
            mask = mask_l_;
            phase_end = max_ - 1;
        } else {
            // L == max: forced cut.
            cuts.push_back(max_);
            pos_ = 0;
            fp_ = 0;
            i += 1;
            continue;
        }
        size_t take = static_cast<size_t>(std::min<uint64_t>(left, phase_end - pos_));
        size_t hit = scan(gear_, data + i, take, fp_, mask);
        if (hit) {
            cuts.push_back(pos_ + hit);
            pos_ = 0;
            fp_ = 0;
            i += hit;
        } else {
            pos_ += take;
            i += take;
        }
    }
}

uint64_t FastCdc::finish() noexcept {
    uint64_t tail = pos_;
    reset();
    return tail;
}

}  // namespace cloudfs_native
