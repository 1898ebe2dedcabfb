// CPU emulation of CANN 8.x's tiling-data macros: the struct the host fills
// becomes a plain struct of the same fields in the same order, which is the
// layout SaveToBuffer writes (Kiln's tiling fields are all 4 bytes wide).
#pragma once
#include <cstdint>

#define BEGIN_TILING_DATA_DEF(name) struct name {
#define TILING_DATA_FIELD_DEF(type, field) type field;
#define END_TILING_DATA_DEF }
#define REGISTER_TILING_DATA_CLASS(op, name)
