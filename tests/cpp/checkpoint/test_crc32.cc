// crc32_update (folded with carry-less multiplication where the CPU has it)
// gives zlib's value at every length and alignment, continuing from any CRC,
// and crc32_join joins the CRCs of two halves.
#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdint>
#include <random>
#include <vector>

#include "checkpoint/io.h"

namespace smp {
namespace ckpt {
namespace {

std::uint32_t zlib_crc(std::uint32_t crc, const unsigned char* p, std::size_t n) {
  return static_cast<std::uint32_t>(crc32(crc, p, static_cast<uInt>(n)));
}

std::vector<unsigned char> random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::vector<unsigned char> v(n);
  for (auto& b : v) b = static_cast<unsigned char>(gen());
  return v;
}

TEST(Crc32, EqualsZlibAtEveryLengthAndAlignment) {
  const auto bytes = random_bytes(600, 1);
  for (std::size_t align = 0; align < 16; ++align) {
    for (std::size_t n = 0; n + align <= bytes.size(); ++n) {
      for (std::uint32_t start : {0u, 0xffffffffu, 0x12345678u}) {
        const unsigned char* p = bytes.data() + align;
        ASSERT_EQ(internal::crc32_update(start, p, n), zlib_crc(start, p, n))
            << "length " << n << ", alignment " << align << ", start " << start;
        ASSERT_EQ(internal::crc32_update_zlib(start, p, n), zlib_crc(start, p, n));
      }
    }
  }
}

TEST(Crc32, LargeBuffersAndSpecialPatterns) {
  for (std::size_t n : {std::size_t{1} << 16, (std::size_t{1} << 20) + 13, std::size_t{3} << 20}) {
    auto bytes = random_bytes(n, static_cast<unsigned>(n));
    EXPECT_EQ(internal::crc32_update(0, bytes.data(), n), zlib_crc(0, bytes.data(), n)) << n;
    std::fill(bytes.begin(), bytes.end(), 0);
    EXPECT_EQ(internal::crc32_update(0, bytes.data(), n), zlib_crc(0, bytes.data(), n)) << n;
    std::fill(bytes.begin(), bytes.end(), 0xff);
    EXPECT_EQ(internal::crc32_update(7, bytes.data(), n), zlib_crc(7, bytes.data(), n)) << n;
  }
}

TEST(Crc32, JoinOfHalvesIsTheWhole) {
  const auto bytes = random_bytes(5000, 3);
  for (std::size_t cut : {0, 1, 63, 64, 65, 2500, 4999, 5000}) {
    const std::uint32_t a = internal::crc32_update(0, bytes.data(), cut);
    const std::uint32_t b = internal::crc32_update(0, bytes.data() + cut, bytes.size() - cut);
    EXPECT_EQ(internal::crc32_join(a, b, bytes.size() - cut),
              zlib_crc(0, bytes.data(), bytes.size()))
        << "cut at " << cut;
  }
}

}  // namespace
}  // namespace ckpt
}  // namespace smp
