// HMAC-SHA256 through OpenSSL libcrypto: block ids and the key-derived gear table.
#pragma once

#include <openssl/types.h>

#include <cstddef>
#include <cstdint>

namespace cloudfs_native {

constexpr size_t kBlockIdSize = 32;

// One HMAC-SHA256 key, set up once and reused for many messages: re-initialising
// an EVP_MAC context with the key it already holds skips the key schedule and the
// provider lookup, which dominate for small chunks.
class HmacSha256 {
public:
    HmacSha256(const uint8_t* key, size_t key_len) noexcept;
    ~HmacSha256();
    HmacSha256(const HmacSha256&) = delete;
    HmacSha256& operator=(const HmacSha256&) = delete;

    bool ok() const noexcept { return ok_; }
    // out: kBlockIdSize bytes.  Returns false when libcrypto fails.
    bool mac(const uint8_t* data, size_t n, uint8_t* out) noexcept;

private:
    EVP_MAC_CTX* ctx_ = nullptr;
    bool ok_ = false;
    bool fresh_ = true;  // the context was just keyed: no re-init needed
};

// HMAC-SHA256(key, data[lengths[0]] ...) for consecutive chunks of data;
// out receives count * kBlockIdSize bytes.  Returns false when libcrypto fails.
bool hmac_sha256_chunks(const uint8_t* key, size_t key_len, const uint8_t* data,
                        const uint64_t* lengths, size_t count, uint8_t* out) noexcept;

// gear[i] = little-endian first 8 bytes of HMAC-SHA256(key, "cloudfs-gear" || i).
bool derive_gear_table(const uint8_t* key, size_t key_len, uint64_t gear[256]) noexcept;

}  // namespace cloudfs_native
