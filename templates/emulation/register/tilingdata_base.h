// Stand-in for CANN 8.x's tiling-data macros, for the emulation and for the
// host-side syntax check: the struct the host fills becomes a plain struct of
// the same fields in the same order, which is the layout SaveToBuffer
// writes (Kiln's tiling fields are all 4 bytes wide), with the set_/get_
// accessors the host code calls.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#define BEGIN_TILING_DATA_DEF(name) struct name {
#define TILING_DATA_FIELD_DEF(type, field) \
    type field;                            \
    void set_##field(type v) { field = v; } \
    type get_##field() const { return field; }
#define END_TILING_DATA_DEF                                                       \
    void SaveToBuffer(void* dst, size_t capacity) const                          \
    {                                                                             \
        std::memcpy(dst, this, sizeof(*this) < capacity ? sizeof(*this) : capacity); \
    }                                                                             \
    size_t GetDataSize() const { return sizeof(*this); }                          \
    }
#define REGISTER_TILING_DATA_CLASS(op, name)
