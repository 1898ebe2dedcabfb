// Stand-in for the CANN host API that Kiln's op_host files use, written
// from the public documentation, for a syntax and type check only: nothing
// here runs, and passing it is no proof that CANN accepts the file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace ge {
enum DataType { DT_FLOAT, DT_FLOAT16, DT_INT8, DT_UINT8 };
enum Format { FORMAT_ND };
using graphStatus = uint32_t;
constexpr graphStatus GRAPH_SUCCESS = 0;
constexpr graphStatus GRAPH_FAILED = 0xFFFFFFFF;
} // namespace ge

namespace gert {
class Shape {
public:
    size_t GetDimNum() const { return dims_.size(); }
    int64_t GetDim(size_t i) const { return dims_[i]; }
    void SetDim(size_t i, int64_t v) { dims_[i] = v; }
    int64_t GetShapeSize() const
    {
        int64_t n = 1;
        for (int64_t d : dims_) {
            n *= d;
        }
        return n;
    }

private:
    std::vector<int64_t> dims_;
};

class StorageShape {
public:
    const Shape& GetStorageShape() const { return shape_; }
    const Shape& GetOriginShape() const { return shape_; }

private:
    Shape shape_;
};

class TilingData {
public:
    void* GetData() { return nullptr; }
    size_t GetCapacity() const { return 0; }
    void SetDataSize(size_t) {}
};

class TilingContext {
public:
    const StorageShape* GetInputShape(size_t) const { return nullptr; }
    void SetBlockDim(uint32_t) {}
    TilingData* GetRawTilingData() { return nullptr; }
    size_t* GetWorkspaceSizes(size_t) { return nullptr; }
};

class InferShapeContext {
public:
    const Shape* GetInputShape(size_t) const { return nullptr; }
    Shape* GetOutputShape(size_t) { return nullptr; }
};

class InferDataTypeContext {
public:
    ge::DataType GetInputDataType(size_t) const { return ge::DT_FLOAT16; }
    void SetOutputDataType(size_t, ge::DataType) {}
};
} // namespace gert

namespace ops {
enum Option { REQUIRED, OPTIONAL, DYNAMIC };

class OpParamDef {
public:
    OpParamDef& ParamType(Option) { return *this; }
    OpParamDef& DataType(std::vector<ge::DataType>) { return *this; }
    OpParamDef& Format(std::vector<ge::Format>) { return *this; }
    OpParamDef& UnknownShapeFormat(std::vector<ge::Format>) { return *this; }
};

class OpAICoreDef {
public:
    OpAICoreDef& SetTiling(ge::graphStatus (*)(gert::TilingContext*)) { return *this; }
    OpAICoreDef& AddConfig(const char*) { return *this; }
};

class OpDef {
public:
    explicit OpDef(const char*) {}
    OpParamDef& Input(const char*) { return param_; }
    OpParamDef& Output(const char*) { return param_; }
    OpDef& SetInferShape(ge::graphStatus (*)(gert::InferShapeContext*)) { return *this; }
    OpDef& SetInferDataType(ge::graphStatus (*)(gert::InferDataTypeContext*)) { return *this; }
    OpAICoreDef& AICore() { return core_; }

private:
    OpParamDef param_;
    OpAICoreDef core_;
};
} // namespace ops

#define OP_ADD(name) static name g_kiln_op_##name(#name)
