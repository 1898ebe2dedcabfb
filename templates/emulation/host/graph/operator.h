// Stand-in for ge::Operator (see register/op_def_registry.h).
#pragma once
namespace ge {
class Operator {};
} // namespace ge
