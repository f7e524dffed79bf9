# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# distutils: language = c++
"""cloudfs._native: the hot loops of the data path (FastCDC chunking, HMAC-SHA256
block ids, zstd, zero detection) in C++, with the GIL released while they run.

Every data argument accepts any object with a contiguous buffer (bytes,
bytearray, memoryview, mmap, ...).  The buffer stays exported while the GIL is
released, so a bytearray cannot be resized under the running loop.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libcpp cimport bool as cbool
from libcpp.vector cimport vector


cdef extern from "fastcdc.hpp" namespace "cloudfs_native" nogil:
    const char* cdc_params_error(uint64_t min_size, uint64_t avg_size, uint64_t max_size)

    cdef cppclass FastCdc:
        FastCdc(const uint64_t* gear, uint64_t min_size, uint64_t avg_size, uint64_t max_size)
        void feed(const uint8_t* data, size_t n, vector[uint64_t]& cuts) except +
        uint64_t finish()
        void reset()

cdef extern from "keyed_hash.hpp" namespace "cloudfs_native" nogil:
    const size_t kBlockIdSize
    cbool hmac_sha256_chunks(const uint8_t* key, size_t key_len, const uint8_t* data,
                             const uint64_t* lengths, size_t count, uint8_t* out)
    cbool derive_gear_table(const uint8_t* key, size_t key_len, uint64_t* gear)

cdef extern from "zstd_codec.hpp" namespace "cloudfs_native" nogil:
    cdef enum class ZstdStatus:
        ok, not_smaller, too_big, corrupt, no_memory
    ZstdStatus zstd_compress(const uint8_t* src, size_t n, int level, uint8_t* dst, size_t cap,
                             size_t* out_len)
    ZstdStatus zstd_content_size(const uint8_t* src, size_t n, uint64_t max_size, uint64_t* size)
    ZstdStatus zstd_decompress_exact(const uint8_t* src, size_t n, uint8_t* dst, size_t size)
    ZstdStatus zstd_decompress_stream(const uint8_t* src, size_t n, uint64_t max_size,
                                      vector[uint8_t]& out)

cdef extern from "zstd.h" nogil:
    int ZSTD_minCLevel()
    int ZSTD_maxCLevel()

cdef extern from "zero.hpp" namespace "cloudfs_native" nogil:
    cbool all_zero(const uint8_t* p, size_t n)


# All keys are 32-byte subkeys (cloudfs.codec.crypto.Keys); any other length is
# a caller passing the wrong thing, and is refused rather than silently hashed.
cdef enum:
    KEY_SIZE = 32


cdef bytes _key(object key, str name):
    cdef bytes k = bytes(key)
    if len(k) != KEY_SIZE:
        raise ValueError(f"{name} must be {KEY_SIZE} bytes, not {len(k)}")
    return k


cdef inline const uint8_t* _ptr(bytes b) noexcept:
    return <const uint8_t*>PyBytes_AS_STRING(b)


cdef int _check_sizes(object min_size, object avg_size, object max_size) except -1:
    if not all(1 <= size <= (1 << 30) for size in (min_size, avg_size, max_size)):
        # Also keeps the values inside uint64_t before the C++ check sees them.
        raise ValueError("chunk sizes must be between 1 byte and 1 GiB")
    cdef const char* err = cdc_params_error(min_size, avg_size, max_size)
    if err != NULL:
        raise ValueError(err.decode())
    return 0


cdef int _gear(bytes gear_key, uint64_t* gear) except -1:
    cdef cbool ok
    cdef const uint8_t* key = _ptr(gear_key)
    with nogil:
        ok = derive_gear_table(key, KEY_SIZE, gear)
    if not ok:
        raise RuntimeError("libcrypto HMAC-SHA256 failed")
    return 0


cdef class Chunker:
    """Streaming FastCDC chunker (normalized, level 2) with a key-derived gear table.

    Holds no data: only the length of the chunk in progress and its fingerprint.
    """

    cdef FastCdc* _cdc
    # Guards the C++ state while the GIL is released: one feed at a time.
    cdef bint _busy

    def __init__(self, gear_key, min_size: int, avg_size: int, max_size: int) -> None:
        cdef uint64_t gear[256]
        cdef bytes key = _key(gear_key, "gear_key")
        _check_sizes(min_size, avg_size, max_size)
        if self._busy:
            raise RuntimeError("Chunker is in use by another thread")
        _gear(key, gear)
        del self._cdc
        self._cdc = new FastCdc(gear, min_size, avg_size, max_size)

    def __dealloc__(self) -> None:
        del self._cdc

    cdef FastCdc* _enter(self) except NULL:
        if self._cdc == NULL:
            raise RuntimeError("Chunker.__init__ was not called")
        if self._busy:
            raise RuntimeError("Chunker is in use by another thread")
        self._busy = True
        return self._cdc

    def feed(self, data) -> list:
        """Consume data; return the lengths of the chunks this call completed."""
        cdef Py_buffer view
        cdef vector[uint64_t] cuts
        cdef FastCdc* cdc = self._enter()
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                with nogil:
                    cdc.feed(<const uint8_t*>view.buf, <size_t>view.len, cuts)
            finally:
                PyBuffer_Release(&view)
        finally:
            self._busy = False
        return cuts

    def finish(self) -> int:
        """Return the length of the trailing partial chunk (0 if none) and reset."""
        cdef FastCdc* cdc = self._enter()
        try:
            return cdc.finish()
        finally:
            self._busy = False

    def reset(self) -> None:
        """Forget the chunk in progress."""
        cdef FastCdc* cdc = self._enter()
        cdc.reset()
        self._busy = False


def chunk_lengths(gear_key, min_size: int, avg_size: int, max_size: int, data) -> list:
    """Lengths of all chunks of data, the trailing partial chunk included (sum == len)."""
    cdef Chunker chunker = Chunker(gear_key, min_size, avg_size, max_size)
    cdef list lengths = chunker.feed(data)
    cdef uint64_t tail = chunker.finish()
    if tail:
        lengths.append(tail)
    return lengths


def gear_table(gear_key) -> list:
    """The 256-entry gear table derived from gear_key (exposed for tests)."""
    cdef uint64_t gear[256]
    _gear(_key(gear_key, "gear_key"), gear)
    return [gear[i] for i in range(256)]


def block_id(id_key, data) -> bytes:
    """HMAC-SHA256(id_key, data): the 32-byte id of a block."""
    cdef bytes key = _key(id_key, "id_key")
    cdef const uint8_t* key_ptr = _ptr(key)
    cdef Py_buffer view
    cdef uint64_t length
    cdef cbool ok
    cdef bytes out = PyBytes_FromStringAndSize(NULL, kBlockIdSize)
    # Writing into `out` is safe: it was just created and nothing else sees it yet.
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        length = <uint64_t>view.len
        with nogil:
            ok = hmac_sha256_chunks(key_ptr, KEY_SIZE, <const uint8_t*>view.buf, &length, 1, dst)
    finally:
        PyBuffer_Release(&view)
    if not ok:
        raise RuntimeError("libcrypto HMAC-SHA256 failed")
    return out


def block_ids(id_key, data, lengths) -> list:
    """Ids of consecutive chunks of data with the given lengths (sum <= len(data))."""
    cdef bytes key = _key(id_key, "id_key")
    cdef const uint8_t* key_ptr = _ptr(key)
    cdef vector[uint64_t] lens
    cdef Py_buffer view
    cdef cbool ok
    cdef size_t i, count
    total = 0
    for length in lengths:
        if length < 0:
            raise ValueError("chunk lengths must not be negative")
        lens.push_back(length)
        total += length
    count = lens.size()
    cdef bytes out = PyBytes_FromStringAndSize(NULL, count * kBlockIdSize)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if total > view.len:
            raise ValueError(f"chunk lengths add up to {total} bytes, data has {view.len}")
        with nogil:
            ok = hmac_sha256_chunks(key_ptr, KEY_SIZE, <const uint8_t*>view.buf, lens.data(),
                                    count, dst)
    finally:
        PyBuffer_Release(&view)
    if not ok:
        raise RuntimeError("libcrypto HMAC-SHA256 failed")
    return [out[i * kBlockIdSize:(i + 1) * kBlockIdSize] for i in range(count)]


def compress(data, int level=3):
    """One zstd frame (content size and checksum recorded), or None when it would
    not be smaller than data."""
    cdef Py_buffer view
    cdef ZstdStatus status
    cdef size_t cap, out_len = 0
    cdef uint8_t* buf
    if not ZSTD_minCLevel() <= level <= ZSTD_maxCLevel():
        raise ValueError(f"zstd level must be between {ZSTD_minCLevel()} and {ZSTD_maxCLevel()}")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len == 0:
            return None
        # Room for one byte less than the input: zstd gives up as soon as the
        # frame cannot be smaller, which is how "not worth it" is detected.
        cap = <size_t>view.len - 1
        buf = <uint8_t*>malloc(cap if cap else 1)
        if buf == NULL:
            raise MemoryError()
        try:
            with nogil:
                status = zstd_compress(<const uint8_t*>view.buf, <size_t>view.len, level, buf, cap,
                                       &out_len)
            if status == ZstdStatus.not_smaller:
                return None
            if status == ZstdStatus.no_memory:
                raise MemoryError()
            if status != ZstdStatus.ok:
                raise RuntimeError("zstd compression failed")
            return PyBytes_FromStringAndSize(<char*>buf, out_len)
        finally:
            free(buf)
    finally:
        PyBuffer_Release(&view)


def decompress(data, max_size) -> bytes:
    """Decompress zstd frames; ValueError when data is not valid zstd or would
    decompress to more than max_size bytes."""
    cdef Py_buffer view
    cdef ZstdStatus status
    cdef uint64_t size = 0
    cdef uint64_t limit
    cdef vector[uint8_t] grown
    cdef bytes out
    cdef uint8_t* dst
    if max_size < 0:
        raise ValueError("max_size must not be negative")
    limit = min(max_size, (1 << 63) - 1)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            status = zstd_content_size(<const uint8_t*>view.buf, <size_t>view.len, limit, &size)
        if status == ZstdStatus.ok:
            out = PyBytes_FromStringAndSize(NULL, size)
            dst = <uint8_t*>PyBytes_AS_STRING(out)
            with nogil:
                status = zstd_decompress_exact(<const uint8_t*>view.buf, <size_t>view.len, dst,
                                               size)
        elif status == ZstdStatus.not_smaller:
            # Some frame does not record its size (streamed output): grow up to the limit.
            with nogil:
                status = zstd_decompress_stream(<const uint8_t*>view.buf, <size_t>view.len, limit,
                                                grown)
            if status == ZstdStatus.ok:
                out = PyBytes_FromStringAndSize(<char*>grown.data(), grown.size())
    finally:
        PyBuffer_Release(&view)
    if status == ZstdStatus.too_big:
        raise ValueError(f"zstd data decompresses to more than {max_size} bytes")
    if status == ZstdStatus.no_memory:
        raise MemoryError()
    if status != ZstdStatus.ok:
        raise ValueError("corrupt or truncated zstd data")
    return out


def is_zero(data) -> bool:
    """True when every byte of data is zero (also for empty data)."""
    cdef Py_buffer view
    cdef cbool zero
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            zero = all_zero(<const uint8_t*>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return zero
