// Copyright © 2026 mtp_splitk contributors
//
// The shim harnesses' host side: arrays in and out as raw files.

#pragma once

#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

template <class T>
std::vector<T> load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<T> v(raw.size() / sizeof(T));
  std::memcpy(v.data(), raw.data(), raw.size());
  return v;
}

template <class T>
void save(const std::string& path, const std::vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}
