// Stand-in for CANN's framework-plugin registration API, for a syntax and
// type check of Kiln's ONNX plugins only (see op_def_registry.h).
#pragma once
#include <cstdint>
#include <string>
#include <vector>
#include "graph/operator.h"

namespace domi {
using Status = uint32_t;
constexpr Status SUCCESS = 0;
enum FrameworkType { CAFFE, TENSORFLOW, ONNX };
enum class ImplyType { BUILDIN, TVM, CUSTOM, AI_CPU };

class OpRegistrationData {
public:
    explicit OpRegistrationData(const char*) {}
    OpRegistrationData& FrameworkType(domi::FrameworkType) { return *this; }
    OpRegistrationData& OriginOpType(const std::vector<std::string>&) { return *this; }
    OpRegistrationData& ParseParamsByOperatorFn(Status (*)(const ge::Operator&, ge::Operator&)) { return *this; }
    OpRegistrationData& ImplyType(domi::ImplyType) { return *this; }
};
} // namespace domi

#define KILN_REGISTER_JOIN2(a, b) a##b
#define KILN_REGISTER_JOIN(a, b) KILN_REGISTER_JOIN2(a, b)
#define REGISTER_CUSTOM_OP(name) \
    static domi::OpRegistrationData KILN_REGISTER_JOIN(g_kiln_registration_, __COUNTER__) = \
        domi::OpRegistrationData(name)
