// HMAC-SHA256 via the OpenSSL 3 EVP_MAC interface (SHA-NI/AVX2 code paths are
// chosen by libcrypto at run time).
#include "keyed_hash.hpp"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include <cstring>

namespace cloudfs_native {

namespace {

// Fetched once per process: EVP_MAC_fetch is a locked provider lookup.  The
// function-local static is initialised thread-safely (C++11) and never freed,
// because other threads may still use it during interpreter shutdown.
EVP_MAC* hmac_algorithm() noexcept {
    static EVP_MAC* mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
    return mac;
}

}  // namespace

HmacSha256::HmacSha256(const uint8_t* key, size_t key_len) noexcept {
    EVP_MAC* mac = hmac_algorithm();
    if (!mac) return;
    ctx_ = EVP_MAC_CTX_new(mac);
    if (!ctx_) return;
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
        OSSL_PARAM_construct_end(),
    };
    // HMAC accepts an empty key, but EVP_MAC_init treats a null key as "reuse":
    // give it a valid pointer either way.
    static const uint8_t empty = 0;
    ok_ = EVP_MAC_init(ctx_, key_len ? key : &empty, key_len,
                       params) == 1;
}

HmacSha256::~HmacSha256() { EVP_MAC_CTX_free(ctx_); }

bool HmacSha256::mac(const uint8_t* data, size_t n, uint8_t* out) noexcept {
    if (!ok_) return false;
    if (!fresh_ && EVP_MAC_init(ctx_, nullptr, 0, nullptr) != 1) return false;
    fresh_ = false;
    size_t out_len = 0;
    if (n && EVP_MAC_update(ctx_, data, n) != 1) return false;
    return EVP_MAC_final(ctx_, out, &out_len, kBlockIdSize) == 1 && out_len == kBlockIdSize;
}

bool hmac_sha256_chunks(const uint8_t* key, size_t key_len, const uint8_t* data,
                        const uint64_t* lengths, size_t count, uint8_t* out) noexcept {
    HmacSha256 h(key, key_len);
    if (!h.ok()) return false;
    for (size_t i = 0; i < count; ++i) {
        if (!h.mac(data, lengths[i], out + i * kBlockIdSize)) return false;
        data += lengths[i];
    }
    return true;
}

bool derive_gear_table(const uint8_t* key, size_t key_len, uint64_t gear[256]) noexcept {
    HmacSha256 h(key, key_len);
    if (!h.ok()) return false;
    static const char label[] = "cloudfs-gear";
    constexpr size_t label_len = sizeof label - 1;
    uint8_t msg[label_len + 1];
    std::memcpy(msg, label, label_len);
    uint8_t digest[kBlockIdSize];
    for (unsigned i = 0; i < 256; ++i) {
        msg[label_len] = static_cast<uint8_t>(i);
        if (!h.mac(msg, sizeof msg, digest)) return false;
        uint64_t v = 0;
        for (int b = 7; b >= 0; --b) v = (v << 8) | digest[b];  // little-endian, any host
        gear[i] = v;
    }
    return true;
}

}  // namespace cloudfs_native
