// Named arrays in one binary file: how the Python tests (tests/emu_util.py) hand inputs
// to an emulated-kernel harness and read its outputs back.  Test infrastructure only.
//
// File layout (little-endian):
//   "REIDEMU1"  u32 count  then per array:
//   u32 name_bytes, name, u8 dtype, u32 ndim, i64 shape[ndim], u64 data_bytes, data
// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16, 4 int64, 5 int32, 6 uint8.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_emu.h"

namespace reid_emu {
namespace io {

enum class DType : uint8_t { f32 = 0, f64 = 1, f16 = 2, bf16 = 3, i64 = 4, i32 = 5, u8 = 6 };

inline size_t element_bytes(DType d) {
  switch (d) {
    case DType::f32: case DType::i32: return 4;
    case DType::f64: case DType::i64: return 8;
    case DType::f16: case DType::bf16: return 2;
    case DType::u8: return 1;
  }
  throw std::runtime_error("reid_emu error: unknown dtype code");
}

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::f32;
  else if constexpr (std::is_same_v<T, double>) return DType::f64;
  else if constexpr (std::is_same_v<T, ::reid_emu::half>) return DType::f16;
  else if constexpr (std::is_same_v<T, ::reid_emu::bfloat16>) return DType::bf16;
  else if constexpr (std::is_same_v<T, int64_t>) return DType::i64;
  else if constexpr (std::is_same_v<T, int32_t>) return DType::i32;
  else {
    static_assert(std::is_same_v<T, uint8_t>, "no tensor_io dtype for this type");
    return DType::u8;
  }
}

struct Array {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  std::vector<unsigned char> bytes;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  template <typename T>
  T* data() {
    check<T>();
    return reinterpret_cast<T*>(bytes.data());
  }
  template <typename T>
  const T* data() const {
    check<T>();
    return reinterpret_cast<const T*>(bytes.data());
  }
  // A 0-d or one-element array as a number.
  double scalar() const {
    if (numel() != 1) throw std::runtime_error("reid_emu error: array '" + name + "' is not a scalar");
    switch (dtype) {
      case DType::f32: return *data<float>();
      case DType::f64: return *data<double>();
      case DType::i64: return static_cast<double>(*data<int64_t>());
      case DType::i32: return *data<int32_t>();
      case DType::u8: return *data<uint8_t>();
      default: throw std::runtime_error("reid_emu error: array '" + name + "': a 16-bit scalar is not supported");
    }
  }

 private:
  template <typename T>
  void check() const {
    if (dtype_of<T>() != dtype) {
      throw std::runtime_error("reid_emu error: array '" + name + "' has dtype code " +
                               std::to_string(static_cast<int>(dtype)) + ", asked as code " +
                               std::to_string(static_cast<int>(dtype_of<T>())));
    }
  }
};

struct Archive {
  std::vector<Array> arrays;

  bool has(const std::string& name) const {
    for (const auto& a : arrays) {
      if (a.name == name) return true;
    }
    return false;
  }
  Array& get(const std::string& name) {
    for (auto& a : arrays) {
      if (a.name == name) return a;
    }
    throw std::runtime_error("reid_emu error: no array named '" + name + "' in the input");
  }
  const Array& get(const std::string& name) const { return const_cast<Archive*>(this)->get(name); }

  Array& add(const std::string& name, DType dtype, std::vector<int64_t> shape) {
    Array a;
    a.name = name;
    a.dtype = dtype;
    a.shape = std::move(shape);
    a.bytes.assign(static_cast<size_t>(a.numel()) * element_bytes(dtype), 0);
    arrays.push_back(std::move(a));
    return arrays.back();
  }
  template <typename T>
  Array& add(const std::string& name, std::vector<int64_t> shape, const T* values) {
    Array& a = add(name, dtype_of<T>(), std::move(shape));
    std::memcpy(a.bytes.data(), values, a.bytes.size());
    return a;
  }
};

namespace detail {
inline void read_exact(std::FILE* f, void* out, size_t n, const std::string& path) {
  if (n > 0 && std::fread(out, 1, n, f) != n) throw std::runtime_error("reid_emu error: truncated file " + path);
}
template <typename T>
T read_value(std::FILE* f, const std::string& path) {
  T v;
  read_exact(f, &v, sizeof v, path);
  return v;
}
template <typename T>
void write_value(std::FILE* f, T v) {
  std::fwrite(&v, sizeof v, 1, f);
}
}  // namespace detail

inline Archive read(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw std::runtime_error("reid_emu error: cannot open " + path);
  Archive archive;
  char magic[8];
  detail::read_exact(f, magic, 8, path);
  if (std::memcmp(magic, "REIDEMU1", 8) != 0) throw std::runtime_error("reid_emu error: not a tensor_io file: " + path);
  const uint32_t count = detail::read_value<uint32_t>(f, path);
  for (uint32_t i = 0; i < count; ++i) {
    Array a;
    a.name.resize(detail::read_value<uint32_t>(f, path));
    detail::read_exact(f, a.name.data(), a.name.size(), path);
    a.dtype = static_cast<DType>(detail::read_value<uint8_t>(f, path));
    a.shape.resize(detail::read_value<uint32_t>(f, path));
    for (auto& s : a.shape) s = detail::read_value<int64_t>(f, path);
    a.bytes.resize(detail::read_value<uint64_t>(f, path));
    if (a.bytes.size() != static_cast<size_t>(a.numel()) * element_bytes(a.dtype)) {
      throw std::runtime_error("reid_emu error: array '" + a.name + "' has a size that does not match its shape");
    }
    detail::read_exact(f, a.bytes.data(), a.bytes.size(), path);
    archive.arrays.push_back(std::move(a));
  }
  std::fclose(f);
  return archive;
}

inline void write(const std::string& path, const Archive& archive) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw std::runtime_error("reid_emu error: cannot write " + path);
  std::fwrite("REIDEMU1", 1, 8, f);
  detail::write_value<uint32_t>(f, static_cast<uint32_t>(archive.arrays.size()));
  for (const auto& a : archive.arrays) {
    detail::write_value<uint32_t>(f, static_cast<uint32_t>(a.name.size()));
    std::fwrite(a.name.data(), 1, a.name.size(), f);
    detail::write_value<uint8_t>(f, static_cast<uint8_t>(a.dtype));
    detail::write_value<uint32_t>(f, static_cast<uint32_t>(a.shape.size()));
    for (int64_t s : a.shape) detail::write_value<int64_t>(f, s);
    detail::write_value<uint64_t>(f, a.bytes.size());
    std::fwrite(a.bytes.data(), 1, a.bytes.size(), f);
  }
  if (std::fclose(f) != 0) throw std::runtime_error("reid_emu error: cannot write " + path);
}

// The harnesses' per-case dtype dispatch: f.template operator()<T>() with T the kernel element
// type of a floating-point array of `dtype` (a lambda `[&]<typename T>() { ... }`); any other
// dtype throws `error`.
template <typename F>
void dispatch_floating(DType dtype, const std::string& error, F&& f) {
  switch (dtype) {
    case DType::f32: f.template operator()<float>(); break;
    case DType::f64: f.template operator()<double>(); break;
    case DType::f16: f.template operator()<reid_emu::half>(); break;
    case DType::bf16: f.template operator()<reid_emu::bfloat16>(); break;
    default: throw std::runtime_error(error);
  }
}

// main() of a harness: `harness IN OUT`; run(in, out) fills `out`; errors are printed as
// "reid_emu error: ..." and exit with status 1.
template <typename Run>
int harness_main(int argc, char** argv, Run&& run) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]);
    return 2;
  }
  try {
    const Archive in = read(argv[1]);
    Archive out;
    run(in, out);
    write(argv[2], out);
  } catch (const std::exception& e) {
    const char* what = e.what();
    std::fprintf(stderr, "%s%s\n", std::strncmp(what, "reid_emu error:", 15) == 0 ? "" : "reid_emu error: ", what);
    return 1;
  }
  return 0;
}

}  // namespace io
}  // namespace reid_emu
