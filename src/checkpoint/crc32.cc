// crc32: the CRC-32 (zip's, as zlib computes it) of checkpoint bytes, folded
// 64 bytes at a time with carry-less multiplication where the CPU has it.
//
// Why not only zlib: zlib's table-driven crc32 runs at about 1.5 GB/s per core,
// so checking every record cost as much CPU as reading it (half of a load's
// thread time on a 16-CPU H200 machine). Folding with PCLMULQDQ runs at
// several times that. The method is the standard one for reflected CRCs: four
// 128-bit lanes are folded forward by 512 bits per step, then into one lane,
// then 16 bytes at a time; the last 128 bits, which are congruent to the whole
// message modulo the CRC polynomial, and the tail of fewer than 16 bytes go
// through zlib. The fold constants are x^d mod P, bit-reflected, for the
// distances used (512 + 32 +/- 32 and 128 + 32 +/- 32 bits). test_crc32 checks
// the result against zlib at every length and alignment around the edges.
#include <zlib.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "checkpoint/io.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SMP_CRC32_FOLD 1
#endif

namespace smp {
namespace ckpt {
namespace internal {

namespace {

std::uint32_t crc32_zlib(std::uint32_t crc, const unsigned char* p, std::size_t n) {
  uLong c = crc;
  while (n > 0) {
    const std::size_t chunk = std::min<std::size_t>(n, std::size_t{1} << 30);
    c = ::crc32(c, p, static_cast<uInt>(chunk));
    p += chunk;
    n -= chunk;
  }
  return static_cast<std::uint32_t>(c);
}

#ifdef SMP_CRC32_FOLD

__attribute__((target("pclmul,sse4.1"))) inline __m128i fold(__m128i x, __m128i k) {
  return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

/// n >= 64. Same result as zlib's crc32(crc, p, n).
__attribute__((target("pclmul,sse4.1"))) std::uint32_t crc32_fold(std::uint32_t crc,
                                                                  const unsigned char* p,
                                                                  std::size_t n) {
  // Low quadword, high quadword.
  const __m128i k512 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
  const __m128i k128 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
  auto load = [](const unsigned char* q) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  };
  // zlib's running register (~crc) enters as the first 32 bits of the message.
  __m128i x0 = _mm_xor_si128(load(p), _mm_cvtsi32_si128(static_cast<int>(~crc)));
  __m128i x1 = load(p + 16), x2 = load(p + 32), x3 = load(p + 48);
  p += 64;
  n -= 64;
  while (n >= 64) {
    x0 = _mm_xor_si128(fold(x0, k512), load(p));
    x1 = _mm_xor_si128(fold(x1, k512), load(p + 16));
    x2 = _mm_xor_si128(fold(x2, k512), load(p + 32));
    x3 = _mm_xor_si128(fold(x3, k512), load(p + 48));
    p += 64;
    n -= 64;
  }
  __m128i x = _mm_xor_si128(fold(x0, k128), x1);
  x = _mm_xor_si128(fold(x, k128), x2);
  x = _mm_xor_si128(fold(x, k128), x3);
  while (n >= 16) {
    x = _mm_xor_si128(fold(x, k128), load(p));
    p += 16;
    n -= 16;
  }
  // x is congruent to the message so far: its CRC from a zero register (zlib's
  // crc32 with 0xffffffff) is the register; the tail continues from there.
  alignas(16) unsigned char last[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(last), x);
  const std::uint32_t reg = crc32_zlib(0xffffffffu, last, sizeof(last));
  return crc32_zlib(reg, p, n);
}

bool has_fold() {
  static const bool has = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return has;
}

#endif  // SMP_CRC32_FOLD

}  // namespace

std::uint32_t crc32_update(std::uint32_t crc, const void* data, std::size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
#ifdef SMP_CRC32_FOLD
  if (n >= 64 && has_fold()) return crc32_fold(crc, p, n);
#endif
  return crc32_zlib(crc, p, n);
}

std::uint32_t crc32_update_zlib(std::uint32_t crc, const void* data, std::size_t n) {
  return crc32_zlib(crc, static_cast<const unsigned char*>(data), n);
}

std::uint32_t crc32_join(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b) {
  return static_cast<std::uint32_t>(
      ::crc32_combine64(crc_a, crc_b, static_cast<z_off64_t>(len_b)));
}

}  // namespace internal
}  // namespace ckpt
}  // namespace smp
