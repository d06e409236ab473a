// Byte sizes with units, as operators write them ("512MiB", "1.5 GiB", "4096").
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace gpup {

// Parses "N", "N B", "N KiB|MiB|GiB|TiB" and the decimal "KB|MB|GB|TB"; case-insensitive units,
// optional space, fractional numbers allowed ("1.5GiB"). Returns nullopt on anything else or overflow.
std::optional<uint64_t> parse_size(std::string_view text);
// 268435456 -> "256 MiB"; exact binary multiples print without decimals, others with one.
std::string format_size(uint64_t bytes);

}  // namespace gpup
