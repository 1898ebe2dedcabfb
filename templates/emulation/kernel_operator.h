// CPU emulation of the subset of the Ascend C API that Kiln's generated
// kernels use, written by the Kiln project from the public Ascend C API
// documentation (no CANN source). It lets the tests compile the same kernel
// source a CANN machine would compile, with g++, and run it on the CPU.
//
// It is stricter than the hardware where the hardware misbehaves silently,
// and loud where the hardware would fault:
// - the UB is a fixed pool of the target's budget; TPipe::InitBuffer past it
//   aborts ("UB overflow"), as CANN's CPU debug mode does;
// - UB operands of vector ops and DataCopy must start 32-byte aligned;
// - DataCopy of a length that is not a multiple of 32 bytes copies the
//   rounded-down length, as the hardware does, and counts each such copy
//   (kiln_emu::State::roundedDownCopies) so a test can see it happened;
// - fresh UB is filled with 0xFF bytes (NaN in half and float), so reading
//   what was never copied shows up as NaN;
// - every GM access is checked against the size given to SetGlobalBuffer;
// - queues fault on AllocTensor without a free buffer, DeQue of an empty
//   queue and double frees; WaitFlag without its SetFlag faults (the
//   hardware would hang);
// - Cast checks the conversion is one the target documents.
// Synchronisation is otherwise a no-op: the emulation runs one pipe at a time.
#pragma once

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <type_traits>
#include <vector>

#define __aicore__
#define __global__
#define __gm__
#define GM_ADDR uint8_t*
#define KERNEL_TASK_TYPE_DEFAULT(type)
#define KERNEL_TYPE_AIV_ONLY 0

using half = _Float16;

namespace kiln_emu {

// The largest UB of any target (310B: 248 KB); each run sets its budget.
constexpr uint32_t kUbPoolBytes = 256 * 1024;

struct State {
    alignas(64) uint8_t ub[kUbPoolBytes];
    uint32_t ubCapacity = 0;
    uint32_t ubUsed = 0;
    bool pipeAlive = false;
    int64_t blockIdx = 0;
    int64_t blockNum = 1;
    bool is310b = false;
    uint64_t roundedDownCopies = 0;
    uint64_t gmBytesRead = 0;
    uint64_t gmBytesWritten = 0;
    int pendingFlags[16][8] = {};
};

inline State& S()
{
    static State* s = new State();
    return *s;
}

[[noreturn]] inline void Fault(const char* fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    std::fprintf(stderr, "KILN_EMU_FAULT: ");
    std::vfprintf(stderr, fmt, args);
    std::fprintf(stderr, "\n");
    va_end(args);
    std::fflush(stderr);
    std::abort();
}

// Starts one core: a fresh, poisoned UB of `ubBytes`.
inline void BeginCore(int64_t idx, int64_t num, uint32_t ubBytes, bool is310b)
{
    State& s = S();
    if (ubBytes > kUbPoolBytes) {
        Fault("UB budget %u exceeds the emulated pool %u", ubBytes, kUbPoolBytes);
    }
    s.ubCapacity = ubBytes;
    s.ubUsed = 0;
    s.pipeAlive = false;
    s.blockIdx = idx;
    s.blockNum = num;
    s.is310b = is310b;
    std::memset(s.ub, 0xFF, sizeof(s.ub));
}

inline void EndCore()
{
    State& s = S();
    for (auto& event : s.pendingFlags) {
        for (int& pending : event) {
            if (pending != 0) {
                Fault("SetFlag without a matching WaitFlag at the end of the kernel");
            }
        }
    }
}

inline uint64_t UbOffset(const void* p)
{
    const uint8_t* b = static_cast<const uint8_t*>(p);
    const uint8_t* base = S().ub;
    if (b < base || b > base + S().ubCapacity) {
        Fault("pointer %p is outside the UB", p);
    }
    return static_cast<uint64_t>(b - base);
}

inline void CheckAligned(const void* p, const char* what)
{
    uint64_t off = UbOffset(p);
    if (off % 32 != 0) {
        Fault("%s: UB address offset %llu is not 32-byte aligned", what, (unsigned long long)off);
    }
}

template <typename T>
void LoadTiling(T* dst, const uint8_t* src)
{
    std::memcpy(dst, src, sizeof(T));
}

} // namespace kiln_emu

#define GET_TILING_DATA(name, ptr) \
    KILN_TILING_TYPE name;         \
    ::kiln_emu::LoadTiling(&name, ptr)

// The pipes, a plain enum at global scope as in CANN.
enum pipe_t { PIPE_S, PIPE_V, PIPE_MTE2, PIPE_MTE3, PIPE_ALL };

namespace AscendC {

enum class TPosition { GM, VECIN, VECOUT, VECCALC, A1, A2, B1, B2, CO1, CO2 };
using QuePosition = TPosition;

enum class RoundMode { CAST_NONE, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC, CAST_ODD };

enum class HardEvent { MTE2_V, V_MTE2, MTE3_V, V_MTE3, V_S, S_V, MTE2_S, S_MTE2, MTE3_S, S_MTE3, MTE2_MTE3, MTE3_MTE2 };
using event_t = int;
constexpr event_t EVENT_ID0 = 0;
constexpr event_t EVENT_ID1 = 1;
constexpr event_t EVENT_ID2 = 2;
constexpr event_t EVENT_ID3 = 3;

template <HardEvent E>
inline void SetFlag(event_t id)
{
    kiln_emu::S().pendingFlags[static_cast<int>(E)][id] += 1;
}

template <HardEvent E>
inline void WaitFlag(event_t id)
{
    int& pending = kiln_emu::S().pendingFlags[static_cast<int>(E)][id];
    if (pending <= 0) {
        kiln_emu::Fault("WaitFlag without a SetFlag (event %d, id %d): the core would hang", static_cast<int>(E), id);
    }
    pending -= 1;
}

template <pipe_t P>
inline void PipeBarrier()
{
}

inline int64_t GetBlockIdx() { return kiln_emu::S().blockIdx; }
inline int64_t GetBlockNum() { return kiln_emu::S().blockNum; }

template <typename T>
class LocalTensor {
public:
    LocalTensor() = default;
    LocalTensor(T* p, uint32_t n) : ptr_(p), size_(n) {}

    LocalTensor operator[](uint32_t offset) const
    {
        if (offset > size_) {
            kiln_emu::Fault("LocalTensor offset %u beyond its %u elements", offset, size_);
        }
        return LocalTensor(ptr_ + offset, size_ - offset);
    }
    T GetValue(uint32_t i) const
    {
        Check(i, "GetValue");
        return ptr_[i];
    }
    void SetValue(uint32_t i, T v) const
    {
        Check(i, "SetValue");
        ptr_[i] = v;
    }
    uint32_t GetSize() const { return size_; }
    template <typename U>
    LocalTensor<U> ReinterpretCast() const
    {
        return LocalTensor<U>(reinterpret_cast<U*>(ptr_), size_ * sizeof(T) / sizeof(U));
    }
    T* Data() const { return ptr_; }

private:
    void Check(uint32_t i, const char* what) const
    {
        if (ptr_ == nullptr || i >= size_) {
            kiln_emu::Fault("%s(%u) outside a LocalTensor of %u elements", what, i, size_);
        }
    }
    T* ptr_ = nullptr;
    uint32_t size_ = 0;
};

template <typename T>
class GlobalTensor {
public:
    void SetGlobalBuffer(__gm__ T* p, uint64_t n)
    {
        ptr_ = p;
        size_ = n;
    }
    GlobalTensor operator[](uint64_t offset) const
    {
        if (offset > size_) {
            kiln_emu::Fault("GlobalTensor offset %llu beyond its %llu elements", (unsigned long long)offset,
                (unsigned long long)size_);
        }
        GlobalTensor g;
        g.SetGlobalBuffer(ptr_ + offset, size_ - offset);
        return g;
    }
    T GetValue(uint64_t i) const
    {
        CheckRange(i, 1);
        return ptr_[i];
    }
    void SetValue(uint64_t i, T v) const
    {
        CheckRange(i, 1);
        ptr_[i] = v;
    }
    // Bytes [offset, offset + len) of this tensor, checked.
    uint8_t* Bytes(uint64_t byteOffset, uint64_t len) const
    {
        if (ptr_ == nullptr || byteOffset + len > size_ * sizeof(T)) {
            kiln_emu::Fault("GM access of %llu bytes at byte %llu outside a GlobalTensor of %llu bytes",
                (unsigned long long)len, (unsigned long long)byteOffset, (unsigned long long)(size_ * sizeof(T)));
        }
        return reinterpret_cast<uint8_t*>(ptr_) + byteOffset;
    }

private:
    void CheckRange(uint64_t i, uint64_t n) const
    {
        if (ptr_ == nullptr || i + n > size_) {
            kiln_emu::Fault("GM element %llu outside a GlobalTensor of %llu elements", (unsigned long long)i,
                (unsigned long long)size_);
        }
    }
    T* ptr_ = nullptr;
    uint64_t size_ = 0;
};

// One buffer slot of a queue, in the UB.
struct QueSlot {
    uint8_t* addr;
    uint32_t bytes;
    bool allocated;
};

class TPipe;

template <TPosition POS, int DEPTH>
class TQue {
public:
    template <typename T>
    LocalTensor<T> AllocTensor()
    {
        for (auto& slot : slots_) {
            if (!slot.allocated) {
                slot.allocated = true;
                return LocalTensor<T>(reinterpret_cast<T*>(slot.addr), slot.bytes / sizeof(T));
            }
        }
        kiln_emu::Fault("AllocTensor on a queue whose %zu buffers are all in use", slots_.size());
    }
    template <typename T>
    bool EnQue(const LocalTensor<T>& t)
    {
        if (queued_.size() >= static_cast<size_t>(DEPTH)) {
            kiln_emu::Fault("EnQue on a full queue of depth %d", DEPTH);
        }
        queued_.push_back(reinterpret_cast<uint8_t*>(t.Data()));
        return true;
    }
    template <typename T>
    LocalTensor<T> DeQue()
    {
        if (queued_.empty()) {
            kiln_emu::Fault("DeQue on an empty queue");
        }
        uint8_t* addr = queued_.front();
        queued_.pop_front();
        QueSlot& slot = Find(addr);
        return LocalTensor<T>(reinterpret_cast<T*>(slot.addr), slot.bytes / sizeof(T));
    }
    template <typename T>
    void FreeTensor(LocalTensor<T>& t)
    {
        QueSlot& slot = Find(reinterpret_cast<uint8_t*>(t.Data()));
        if (!slot.allocated) {
            kiln_emu::Fault("FreeTensor of a buffer that is not allocated");
        }
        slot.allocated = false;
    }

private:
    friend class TPipe;
    QueSlot& Find(uint8_t* addr)
    {
        for (auto& slot : slots_) {
            if (slot.addr == addr) {
                return slot;
            }
        }
        kiln_emu::Fault("a tensor that does not belong to this queue");
    }
    std::vector<QueSlot> slots_;
    std::deque<uint8_t*> queued_;
};

template <TPosition POS>
class TBuf {
public:
    template <typename T>
    LocalTensor<T> Get() const
    {
        return LocalTensor<T>(reinterpret_cast<T*>(addr_), bytes_ / sizeof(T));
    }
    template <typename T>
    LocalTensor<T> Get(uint32_t count) const
    {
        if (count * sizeof(T) > bytes_) {
            kiln_emu::Fault("TBuf::Get of %u elements from a %u-byte buffer", count, bytes_);
        }
        return LocalTensor<T>(reinterpret_cast<T*>(addr_), count);
    }

private:
    friend class TPipe;
    uint8_t* addr_ = nullptr;
    uint32_t bytes_ = 0;
};

class TPipe {
public:
    TPipe()
    {
        if (kiln_emu::S().pipeAlive) {
            kiln_emu::Fault("a second TPipe while one is alive");
        }
        kiln_emu::S().pipeAlive = true;
    }
    ~TPipe() { kiln_emu::S().pipeAlive = false; }

    template <TPosition POS, int DEPTH>
    bool InitBuffer(TQue<POS, DEPTH>& que, uint8_t num, uint32_t len)
    {
        for (uint8_t i = 0; i < num; ++i) {
            que.slots_.push_back(QueSlot{Take(len), len, false});
        }
        return true;
    }
    template <TPosition POS>
    bool InitBuffer(TBuf<POS>& buf, uint32_t len)
    {
        buf.addr_ = Take(len);
        buf.bytes_ = len;
        return true;
    }

private:
    static uint8_t* Take(uint32_t len)
    {
        kiln_emu::State& s = kiln_emu::S();
        uint32_t rounded = (len + 31u) / 32u * 32u;
        if (len == 0) {
            kiln_emu::Fault("InitBuffer of 0 bytes");
        }
        if (static_cast<uint64_t>(s.ubUsed) + rounded > s.ubCapacity) {
            kiln_emu::Fault("UB overflow: InitBuffer of %u bytes with %u of %u in use", len, s.ubUsed, s.ubCapacity);
        }
        uint8_t* p = s.ub + s.ubUsed;
        s.ubUsed += rounded;
        return p;
    }
};

// ---- data movement -------------------------------------------------------

struct DataCopyExtParams {
    DataCopyExtParams() = default;
    DataCopyExtParams(uint16_t count, uint32_t len, uint32_t srcStrideIn, uint32_t dstStrideIn, uint32_t rsvIn)
        : blockCount(count), blockLen(len), srcStride(srcStrideIn), dstStride(dstStrideIn), rsv(rsvIn)
    {
    }
    uint16_t blockCount = 1;
    uint32_t blockLen = 0;
    uint32_t srcStride = 0;
    uint32_t dstStride = 0;
    uint32_t rsv = 0;
};

template <typename T>
struct DataCopyPadExtParams {
    DataCopyPadExtParams() = default;
    DataCopyPadExtParams(bool pad, uint8_t left, uint8_t right, T value)
        : isPad(pad), leftPadding(left), rightPadding(right), paddingValue(value)
    {
    }
    bool isPad = false;
    uint8_t leftPadding = 0;
    uint8_t rightPadding = 0;
    T paddingValue = T(0);
};

namespace detail {
// The hardware moves whole 32-byte blocks: a length that is not a multiple
// of 32 bytes is silently rounded down.
inline uint64_t RoundDownCopy(uint64_t bytes)
{
    uint64_t rounded = bytes / 32 * 32;
    if (rounded != bytes) {
        kiln_emu::S().roundedDownCopies += 1;
    }
    return rounded;
}

template <typename T>
void CheckUbRange(const LocalTensor<T>& t, uint64_t bytes, const char* what)
{
    kiln_emu::CheckAligned(t.Data(), what);
    if (bytes > static_cast<uint64_t>(t.GetSize()) * sizeof(T)) {
        kiln_emu::Fault("%s of %llu bytes into a LocalTensor of %llu bytes", what, (unsigned long long)bytes,
            (unsigned long long)(t.GetSize() * sizeof(T)));
    }
}
} // namespace detail

template <typename T>
void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t count)
{
    uint64_t bytes = detail::RoundDownCopy(static_cast<uint64_t>(count) * sizeof(T));
    detail::CheckUbRange(dst, bytes, "DataCopy GM->UB");
    std::memcpy(dst.Data(), src.Bytes(0, bytes), bytes);
    kiln_emu::S().gmBytesRead += bytes;
}

template <typename T>
void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count)
{
    uint64_t bytes = detail::RoundDownCopy(static_cast<uint64_t>(count) * sizeof(T));
    detail::CheckUbRange(src, bytes, "DataCopy UB->GM");
    std::memcpy(dst.Bytes(0, bytes), src.Data(), bytes);
    kiln_emu::S().gmBytesWritten += bytes;
}

// GM -> UB: blockCount blocks of blockLen bytes, srcStride bytes apart in
// GM; in the UB each block starts on a 32-byte boundary, dstStride 32-byte
// blocks after the previous one's padded end.
template <typename T>
void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& p,
    const DataCopyPadExtParams<T>& pad)
{
    if (p.blockCount == 0 || p.blockCount > 4095 || p.blockLen == 0 || p.blockLen > 2097151 ||
        p.blockLen % sizeof(T) != 0) {
        kiln_emu::Fault("DataCopyPad GM->UB: blockCount %u, blockLen %u out of range", p.blockCount, p.blockLen);
    }
    uint64_t padded = (p.blockLen + 31u) / 32u * 32u;
    uint64_t ubPitch = padded + static_cast<uint64_t>(p.dstStride) * 32;
    uint64_t gmPitch = static_cast<uint64_t>(p.blockLen) + p.srcStride;
    detail::CheckUbRange(dst, ubPitch * (p.blockCount - 1) + padded, "DataCopyPad GM->UB");
    uint8_t* out = reinterpret_cast<uint8_t*>(dst.Data());
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        std::memcpy(out + b * ubPitch, src.Bytes(b * gmPitch, p.blockLen), p.blockLen);
        if (pad.isPad) {
            T* tail = reinterpret_cast<T*>(out + b * ubPitch + p.blockLen);
            for (uint64_t i = 0; i < (padded - p.blockLen) / sizeof(T); ++i) {
                tail[i] = pad.paddingValue;
            }
        }
    }
    kiln_emu::S().gmBytesRead += static_cast<uint64_t>(p.blockLen) * p.blockCount;
}

// UB -> GM: blocks start on 32-byte boundaries in the UB (srcStride in
// 32-byte blocks) and are written blockLen bytes each, dstStride bytes apart.
template <typename T>
void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& p)
{
    if (p.blockCount == 0 || p.blockCount > 4095 || p.blockLen == 0 || p.blockLen > 2097151) {
        kiln_emu::Fault("DataCopyPad UB->GM: blockCount %u, blockLen %u out of range", p.blockCount, p.blockLen);
    }
    uint64_t padded = (p.blockLen + 31u) / 32u * 32u;
    uint64_t ubPitch = padded + static_cast<uint64_t>(p.srcStride) * 32;
    uint64_t gmPitch = static_cast<uint64_t>(p.blockLen) + p.dstStride;
    detail::CheckUbRange(src, ubPitch * (p.blockCount - 1) + p.blockLen, "DataCopyPad UB->GM");
    const uint8_t* in = reinterpret_cast<const uint8_t*>(src.Data());
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        std::memcpy(dst.Bytes(b * gmPitch, p.blockLen), in + b * ubPitch, p.blockLen);
    }
    kiln_emu::S().gmBytesWritten += static_cast<uint64_t>(p.blockLen) * p.blockCount;
}

// ---- vector ops (the count form) ------------------------------------------

namespace detail {
template <typename T>
void CheckOperand(const LocalTensor<T>& t, int32_t count, const char* op)
{
    kiln_emu::CheckAligned(t.Data(), op);
    if (count < 0 || static_cast<uint32_t>(count) > t.GetSize()) {
        kiln_emu::Fault("%s of %d elements on a LocalTensor of %u", op, count, t.GetSize());
    }
}

// Arithmetic in T: half results are rounded to half after each op, as the
// vector unit computes them.
template <typename T, typename F>
void Unary(const LocalTensor<T>& dst, const LocalTensor<T>& src, int32_t count, const char* op, F f)
{
    CheckOperand(dst, count, op);
    CheckOperand(src, count, op);
    for (int32_t i = 0; i < count; ++i) {
        dst.Data()[i] = static_cast<T>(f(static_cast<float>(src.Data()[i])));
    }
}

template <typename T, typename F>
void Binary(const LocalTensor<T>& dst, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t count,
    const char* op, F f)
{
    CheckOperand(dst, count, op);
    CheckOperand(a, count, op);
    CheckOperand(b, count, op);
    for (int32_t i = 0; i < count; ++i) {
        dst.Data()[i] = static_cast<T>(f(static_cast<float>(a.Data()[i]), static_cast<float>(b.Data()[i])));
    }
}
} // namespace detail

template <typename T>
void Add(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t n)
{
    detail::Binary(d, a, b, n, "Add", [](float x, float y) { return x + y; });
}
template <typename T>
void Sub(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t n)
{
    detail::Binary(d, a, b, n, "Sub", [](float x, float y) { return x - y; });
}
template <typename T>
void Mul(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t n)
{
    detail::Binary(d, a, b, n, "Mul", [](float x, float y) { return x * y; });
}
template <typename T>
void Div(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t n)
{
    detail::Binary(d, a, b, n, "Div", [](float x, float y) { return x / y; });
}
template <typename T>
void Max(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t n)
{
    detail::Binary(d, a, b, n, "Max", [](float x, float y) { return x > y ? x : y; });
}
// The scalar has the tensor's type, as in CANN's signatures (`const T&`):
// a float scalar for a half tensor does not compile there, nor here.
template <typename T>
void Adds(const LocalTensor<T>& d, const LocalTensor<T>& a, const T& s, int32_t n)
{
    float v = static_cast<float>(s);
    detail::Unary(d, a, n, "Adds", [v](float x) { return x + v; });
}
template <typename T>
void Muls(const LocalTensor<T>& d, const LocalTensor<T>& a, const T& s, int32_t n)
{
    float v = static_cast<float>(s);
    detail::Unary(d, a, n, "Muls", [v](float x) { return x * v; });
}
template <typename T>
void Maxs(const LocalTensor<T>& d, const LocalTensor<T>& a, const T& s, int32_t n)
{
    float v = static_cast<float>(s);
    detail::Unary(d, a, n, "Maxs", [v](float x) { return x > v ? x : v; });
}
template <typename T>
void Exp(const LocalTensor<T>& d, const LocalTensor<T>& a, int32_t n)
{
    detail::Unary(d, a, n, "Exp", [](float x) { return std::exp(x); });
}
template <typename T>
void Sqrt(const LocalTensor<T>& d, const LocalTensor<T>& a, int32_t n)
{
    detail::Unary(d, a, n, "Sqrt", [](float x) { return std::sqrt(x); });
}
template <typename T>
void Abs(const LocalTensor<T>& d, const LocalTensor<T>& a, int32_t n)
{
    detail::Unary(d, a, n, "Abs", [](float x) { return std::fabs(x); });
}
template <typename T>
void Duplicate(const LocalTensor<T>& d, const T& s, int32_t n)
{
    detail::CheckOperand(d, n, "Duplicate");
    for (int32_t i = 0; i < n; ++i) {
        d.Data()[i] = static_cast<T>(s);
    }
}

namespace detail {
template <typename T>
constexpr const char* TypeName()
{
    if constexpr (std::is_same_v<T, half>) return "half";
    else if constexpr (std::is_same_v<T, float>) return "float";
    else if constexpr (std::is_same_v<T, int8_t>) return "int8_t";
    else if constexpr (std::is_same_v<T, uint8_t>) return "uint8_t";
    else if constexpr (std::is_same_v<T, int32_t>) return "int32_t";
    else return "other";
}

// The conversions Kiln's kernels use, all documented for both 310B and 910B.
template <typename D, typename S>
constexpr bool CastDocumented()
{
    return (std::is_same_v<S, half> && std::is_same_v<D, float>) ||
           (std::is_same_v<S, float> && std::is_same_v<D, half>) ||
           (std::is_same_v<S, int8_t> && std::is_same_v<D, half>) ||
           (std::is_same_v<S, uint8_t> && std::is_same_v<D, half>) ||
           (std::is_same_v<S, half> && std::is_same_v<D, uint8_t>) ||
           (std::is_same_v<S, half> && std::is_same_v<D, int8_t>);
}

inline double Round(double v, RoundMode mode)
{
    switch (mode) {
        case RoundMode::CAST_FLOOR: return std::floor(v);
        case RoundMode::CAST_CEIL: return std::ceil(v);
        case RoundMode::CAST_ROUND: return std::round(v);
        case RoundMode::CAST_TRUNC: return std::trunc(v);
        default: return std::nearbyint(v); // half to even in the default FP mode
    }
}
} // namespace detail

template <typename D, typename S>
void Cast(const LocalTensor<D>& dst, const LocalTensor<S>& src, RoundMode mode, uint32_t count)
{
    static_assert(detail::CastDocumented<D, S>(), "a Cast the target does not document");
    detail::CheckOperand(dst, static_cast<int32_t>(count), "Cast");
    detail::CheckOperand(src, static_cast<int32_t>(count), "Cast");
    for (uint32_t i = 0; i < count; ++i) {
        S v = src.Data()[i];
        if constexpr (std::is_integral_v<D>) {
            double r = detail::Round(static_cast<double>(v), mode);
            double lo = static_cast<double>(std::numeric_limits<D>::min());
            double hi = static_cast<double>(std::numeric_limits<D>::max());
            dst.Data()[i] = static_cast<D>(r < lo ? lo : (r > hi ? hi : r));
        } else if constexpr (std::is_same_v<D, half> && std::is_same_v<S, float>) {
            if (mode != RoundMode::CAST_NONE && mode != RoundMode::CAST_RINT) {
                kiln_emu::Fault("Cast float->half: only CAST_NONE / CAST_RINT are emulated");
            }
            dst.Data()[i] = static_cast<half>(v); // round to nearest even
        } else {
            dst.Data()[i] = static_cast<D>(v); // exact widening
        }
    }
}

// dst[0] = Σ src[0..count): a tree sum inside each 256-byte repeat, then a
// tree sum across the repeats. `work` holds one partial per repeat.
template <typename T>
void ReduceSum(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work, int32_t count)
{
    detail::CheckOperand(dst, 1, "ReduceSum");
    detail::CheckOperand(src, count, "ReduceSum");
    const int32_t perRepeat = 256 / static_cast<int32_t>(sizeof(T));
    const int32_t repeats = (count + perRepeat - 1) / perRepeat;
    detail::CheckOperand(work, repeats, "ReduceSum work");
    auto tree = [](std::vector<float>& v) {
        while (v.size() > 1) {
            std::vector<float> next((v.size() + 1) / 2);
            for (size_t i = 0; i < next.size(); ++i) {
                next[i] = v[2 * i] + (2 * i + 1 < v.size() ? v[2 * i + 1] : 0.0f);
            }
            v.swap(next);
        }
        return v.empty() ? 0.0f : v[0];
    };
    std::vector<float> partials;
    for (int32_t r = 0; r < repeats; ++r) {
        std::vector<float> lane;
        for (int32_t i = r * perRepeat; i < count && i < (r + 1) * perRepeat; ++i) {
            lane.push_back(static_cast<float>(src.Data()[i]));
        }
        float p = tree(lane);
        work.Data()[r] = static_cast<T>(p);
        partials.push_back(static_cast<float>(static_cast<T>(p)));
    }
    dst.Data()[0] = static_cast<T>(tree(partials));
}

} // namespace AscendC

