// zstd compression of whole blocks through libzstd, with per-thread contexts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace cloudfs_native {

enum class ZstdStatus { ok, not_smaller, too_big, corrupt, no_memory };

// Compress src into one zstd frame (content size and checksum recorded) into
// dst[0, cap).  not_smaller when the frame would need cap bytes or more: the
// caller passes cap = n - 1 to learn "not worth it" without a second buffer.
ZstdStatus zstd_compress(const uint8_t* src, size_t n, int level, uint8_t* dst, size_t cap,
                         size_t* out_len) noexcept;

// Upper bound of a compressed frame for n input bytes.
size_t zstd_bound(size_t n) noexcept;

// Decompressed size announced by the frame headers of src: ok with *size set,
// too_big when it exceeds max_size, corrupt when src is not zstd data, and
// not_smaller (reused as "unknown") when some frame does not record its size.
ZstdStatus zstd_content_size(const uint8_t* src, size_t n, uint64_t max_size,
                             uint64_t* size) noexcept;

// Decompress into dst, which must hold exactly `size` bytes (from zstd_content_size).
ZstdStatus zstd_decompress_exact(const uint8_t* src, size_t n, uint8_t* dst, size_t size) noexcept;

// Decompress frames without recorded sizes, growing out up to max_size bytes.
ZstdStatus zstd_decompress_stream(const uint8_t* src, size_t n, uint64_t max_size,
                                  std::vector<uint8_t>& out) noexcept;

}  // namespace cloudfs_native
