// zstd block codec.  Contexts are thread-local and reused: creating one per block
// costs allocations and table set-up comparable to compressing a small block, and
// the Python callers run compression on several worker threads at once.
#include "zstd_codec.hpp"

#include <zstd.h>
#include <zstd_errors.h>

#include <algorithm>
#include <memory>
#include <new>

namespace cloudfs_native {

namespace {

struct CctxFree {
    void operator()(ZSTD_CCtx* c) const noexcept { ZSTD_freeCCtx(c); }
};
struct DctxFree {
    void operator()(ZSTD_DCtx* d) const noexcept { ZSTD_freeDCtx(d); }
};

ZSTD_CCtx* thread_cctx() noexcept {
    thread_local std::unique_ptr<ZSTD_CCtx, CctxFree> cctx(ZSTD_createCCtx());
    return cctx.get();
}

ZSTD_DCtx* thread_dctx() noexcept {
    thread_local std::unique_ptr<ZSTD_DCtx, DctxFree> dctx(ZSTD_createDCtx());
    return dctx.get();
}

}  // namespace

size_t zstd_bound(size_t n) noexcept { return ZSTD_compressBound(n); }

ZstdStatus zstd_compress(const uint8_t* src, size_t n, int level, uint8_t* dst, size_t cap,
                         size_t* out_len) noexcept {
    ZSTD_CCtx* cctx = thread_cctx();
    if (!cctx) return ZstdStatus::no_memory;
    // Parameters are sticky on a reused context: reset them all for every frame.
    ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
    if (ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1)))
        return ZstdStatus::corrupt;  // only an out-of-range level gets here
    size_t r = ZSTD_compress2(cctx, dst, cap, src, n);
    if (ZSTD_isError(r)) {
        if (ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall) return ZstdStatus::not_smaller;
        if (ZSTD_getErrorCode(r) == ZSTD_error_memory_allocation) return ZstdStatus::no_memory;
        return ZstdStatus::corrupt;
    }
    *out_len = r;
    return ZstdStatus::ok;
}

ZstdStatus zstd_content_size(const uint8_t* src, size_t n, uint64_t max_size,
                             uint64_t* size) noexcept {
    if (n == 0) return ZstdStatus::corrupt;  // no frame at all
    // Walk the frames with the stable API (ZSTD_findDecompressedSize is
    // experimental): each must parse and, to be sized, record its content size.
    uint64_t total = 0;
    bool known = true;
    while (n > 0) {
        size_t frame_len = ZSTD_findFrameCompressedSize(src, n);
        if (ZSTD_isError(frame_len)) return ZstdStatus::corrupt;
        unsigned long long s = ZSTD_getFrameContentSize(src, frame_len);
        if (s == ZSTD_CONTENTSIZE_ERROR) return ZstdStatus::corrupt;
        if (s == ZSTD_CONTENTSIZE_UNKNOWN) {
            known = false;
        } else {
            if (s > max_size - total) return ZstdStatus::too_big;
            total += s;
        }
        src += frame_len;
        n -= frame_len;
    }
    if (!known) return ZstdStatus::not_smaller;
    *size = total;
    return ZstdStatus::ok;
}

ZstdStatus zstd_decompress_exact(const uint8_t* src, size_t n, uint8_t* dst, size_t size) noexcept {
    ZSTD_DCtx* dctx = thread_dctx();
    if (!dctx) return ZstdStatus::no_memory;
    ZSTD_DCtx_reset(dctx, ZSTD_reset_session_and_parameters);
    size_t r = ZSTD_decompressDCtx(dctx, dst, size, src, n);
    // The headers promised `size` bytes; anything else means a lying frame.
    if (ZSTD_isError(r) || r != size) return ZstdStatus::corrupt;
    return ZstdStatus::ok;
}

ZstdStatus zstd_decompress_stream(const uint8_t* src, size_t n, uint64_t max_size,
                                  std::vector<uint8_t>& out) noexcept {
    ZSTD_DCtx* dctx = thread_dctx();
    if (!dctx) return ZstdStatus::no_memory;
    ZSTD_DCtx_reset(dctx, ZSTD_reset_session_and_parameters);
    try {
        ZSTD_inBuffer in{src, n, 0};
        size_t produced = 0;
        out.resize(static_cast<size_t>(std::min<uint64_t>(max_size, ZSTD_DStreamOutSize())));
        for (;;) {
            uint8_t probe;
            ZSTD_outBuffer o{out.data() + produced, out.size() - produced, 0};
            if (produced == out.size()) {
                if (out.size() < max_size) {
                    out.resize(static_cast<size_t>(std::min<uint64_t>(max_size, out.size() * 2)));
                    continue;
                }
                // Full at the limit: a single further byte of output means too big.
                o = ZSTD_outBuffer{&probe, 1, 0};
            }
            size_t r = ZSTD_decompressStream(dctx, &o, &in);
            if (ZSTD_isError(r)) return ZstdStatus::corrupt;
            if (o.dst == &probe) {
                if (o.pos) return ZstdStatus::too_big;
            } else {
                produced += o.pos;
            }
            if (r == 0 && in.pos == in.size) break;  // last frame complete
            // Input used up, room left for output, frame unfinished: truncated.
            if (r != 0 && in.pos == in.size && o.pos < o.size) return ZstdStatus::corrupt;
        }
        out.resize(produced);
    } catch (const std::bad_alloc&) {
        return ZstdStatus::no_memory;
    }
    return ZstdStatus::ok;
}

}  // namespace cloudfs_native
