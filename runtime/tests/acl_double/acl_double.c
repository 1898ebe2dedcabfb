/*
 * A TEST DOUBLE of AscendCL, built by the runtime's tests (see harness.rs).
 * It is not CANN and runs nothing on an NPU. It exports the ACL functions
 * Kiln calls, records every call in $KILN_ACL_DOUBLE_LOG, and acts as a fake
 * device whose "device memory" is ordinary heap memory it keeps track of.
 *
 * Models:
 * - a file that is not an .om: one input "x" and one output "y" (float32
 *   [1, 4]); execute writes y = 2x.
 * - an .om (magic "IMOD"): described from its MODEL_INOUT_INFO partition,
 *   as ACL would. If its inputs are Kiln's (input_ids, position_ids,
 *   attention_mask, logits_index, k_cache, v_cache; optionally
 *   attention_mask_local), execute plays a fake
 *   language model: it first checks that every cache slot the mask shows
 *   holds what an earlier step's k_new/v_new wrote there (else it fails,
 *   with the slot in the message), then fills k_new/v_new from the position
 *   ids (kiln_pattern below) and writes logits whose argmax is
 *   (7 * token + 3 * position + 1) % vocab at logits_index.
 *
 * External weights: partition 0 is GE's ModelDef (protobuf, ge_ir.proto:
 * ModelDef.graph 7 -> GraphDef.op 6 -> OpDef {type 2, attr 10: {key 1,
 * AttrDef 2 {s 2}}}); its FileConstant ops name their files in the attr
 * `location` (or `file_path`). At load each must exist in
 * weight/ beside the .om. A file registered on the config handle
 * (aclmdlSetExternalWeightAddress) is used in place, after checking that
 * the buffer is device memory, sized a multiple of 32 and at least the
 * file, and holds the file's bytes; any other is "read by the loader" into
 * memory of the double's own (recorded with its size, as GE would copy it).
 * Built with -DKILN_DOUBLE_OLD_CANN it lacks the config calls, as ACL
 * before CANN 8.5 does.
 *
 * Knobs: $KILN_ACL_DOUBLE_RUN_MODE=host reports ACL_HOST (else ACL_DEVICE);
 * $KILN_ACL_DOUBLE_SOC names the chip aclrtGetSocName reports (else
 * Ascend310B1, the default target);
 * $KILN_ACL_DOUBLE_FAIL_EXECUTE makes aclmdlExecute fail;
 * $KILN_ACL_DOUBLE_FAIL_LOAD=<file name> makes loading that file fail.
 * At aclFinalize it records how many objects were never released.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_MODELS 8
#define MAX_IO 8
#define MAX_ALLOCS 8192
#define MAX_RANK 8

/* A marker anything can grep the library for (examples/board-check.sh does,
 * to say in its report that no real ACL ran). */
__attribute__((used)) const char kiln_acl_test_double_marker[] = "KILN ACL TEST DOUBLE: not CANN, no NPU";

static int live_objects = 0;
static const char *last_error = NULL;
static char message[512];

static void record(const char *format, ...) {
    const char *path = getenv("KILN_ACL_DOUBLE_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    va_list args;
    va_start(args, format);
    vfprintf(f, format, args);
    va_end(args);
    fputc('\n', f);
    fclose(f);
}

static int fail(int code, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    last_error = message;
    return code;
}

static void *object(size_t size) {
    live_objects++;
    return calloc(1, size < 1 ? 1 : size);
}

static void release(void *p) {
    if (p) {
        live_objects--;
        free(p);
    }
}

/* ---- device memory: heap blocks the double remembers ---- */

typedef struct {
    char *ptr;
    size_t size;
} Alloc;

static Alloc allocs[MAX_ALLOCS];

/* Whether [p, p + n) lies inside one live aclrtMalloc block. */
static int is_device_memory(const void *p, size_t n) {
    const char *c = p;
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (allocs[i].ptr && c >= allocs[i].ptr && c + n <= allocs[i].ptr + allocs[i].size) return 1;
    }
    return 0;
}

/* ---- process, device, context, stream ---- */

typedef struct {
    char name[128];
    size_t dimCount;
    int64_t dims[128];
} aclmdlIODims;

int aclInit(const char *config) { (void)config; record("aclInit"); return 0; }

int aclFinalize(void) {
    record("aclFinalize");
    record("live objects at finalize: %d", live_objects);
    return 0;
}

const char *aclGetRecentErrMsg(void) { return last_error; }

int aclrtGetRunMode(int *mode) {
    const char *want = getenv("KILN_ACL_DOUBLE_RUN_MODE");
    record("aclrtGetRunMode");
    *mode = want && strcmp(want, "host") == 0 ? 1 : 0;
    return 0;
}
int aclrtGetDeviceCount(uint32_t *count) { *count = 1; return 0; }
const char *aclrtGetSocName(void) {
    const char *soc = getenv("KILN_ACL_DOUBLE_SOC");
    return soc ? soc : "Ascend310B1";
}
int aclrtGetVersion(int32_t *major, int32_t *minor, int32_t *patch) {
    *major = 0;
    *minor = 0;
    *patch = 0;
    return 0;
}

int aclrtSetDevice(int32_t id) {
    record("aclrtSetDevice");
    if (id != 0) return fail(107001, "test double: only device 0 exists");
    return 0;
}
int aclrtResetDevice(int32_t id) { (void)id; record("aclrtResetDevice"); return 0; }

int aclrtCreateContext(void **context, int32_t id) { (void)id; record("aclrtCreateContext"); *context = object(8); return 0; }
int aclrtDestroyContext(void *context) { record("aclrtDestroyContext"); release(context); return 0; }
int aclrtSetCurrentContext(void *context) { (void)context; return 0; }
int aclrtCreateStream(void **stream) { record("aclrtCreateStream"); *stream = object(8); return 0; }
int aclrtDestroyStream(void *stream) { record("aclrtDestroyStream"); release(stream); return 0; }
int aclrtSynchronizeStream(void *stream) { (void)stream; return 0; }

int aclrtMalloc(void **p, size_t size, int policy) {
    (void)policy;
    record("aclrtMalloc");
    record("malloc size %zu", size);
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (!allocs[i].ptr) {
            allocs[i].ptr = object(size);
            allocs[i].size = size;
            *p = allocs[i].ptr;
            return 0;
        }
    }
    return fail(200000, "test double: out of allocation slots");
}

int aclrtFree(void *p) {
    record("aclrtFree");
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (allocs[i].ptr == p) {
            release(p);
            allocs[i].ptr = NULL;
            return 0;
        }
    }
    return fail(100000, "test double: aclrtFree of memory aclrtMalloc did not return");
}

int aclrtMemcpy(void *dst, size_t dst_max, const void *src, size_t count, int kind) {
    static const char *names[] = {"host_to_host", "host_to_device", "device_to_host", "device_to_device"};
    if (kind < 0 || kind > 3) return fail(100000, "test double: memcpy kind %d", kind);
    record("aclrtMemcpy %s", names[kind]);
    if (count > dst_max) return fail(100000, "test double: copy larger than its destination");
    /* The kind must say truly which side each pointer is on. */
    int dst_device = kind == 1 || kind == 3, src_device = kind == 2 || kind == 3;
    if (dst_device != is_device_memory(dst, count) || src_device != is_device_memory(src, count)) {
        return fail(100000, "test double: aclrtMemcpy %s of %zu bytes between the wrong kinds of memory",
                    names[kind], count);
    }
    memmove(dst, src, count);
    return 0;
}

/* ---- models ---- */

typedef struct {
    char name[128];
    int dtype;
    size_t rank;
    int64_t dims[MAX_RANK];
} Tensor;

#define MAX_WEIGHTS 4096

typedef struct {
    int loaded;
    int kiln; /* Kiln's inputs: execute plays the fake language model */
    char file[128];
    size_t n_in, n_out;
    Tensor in[MAX_IO], out[MAX_IO];
    /* External weight files (FileConstants) and the copies the loader made. */
    size_t n_weights;
    char weights[MAX_WEIGHTS][128];
    void *loader_copies[MAX_WEIGHTS];
} Model;

/* A registration made with aclmdlSetExternalWeightAddress. */
typedef struct {
    char name[128];
    void *ptr;
    size_t size;
} Registration;

typedef struct {
    size_t load_type;
    char path[4096];
    int has_path;
    size_t n_regs;
    Registration regs[MAX_WEIGHTS];
} ConfigHandle;

static Model models[MAX_MODELS]; /* model id = index + 1 */

typedef struct {
    Model *model;
} Desc;

static Model *model_by_id(uint32_t id) {
    if (id < 1 || id > MAX_MODELS || !models[id - 1].loaded) return NULL;
    return &models[id - 1];
}

static size_t dtype_size(int dtype) {
    switch (dtype) {
    case 0: case 3: return 4; /* float32, int32 */
    case 1: return 2;         /* float16 */
    case 9: return 8;         /* int64 */
    default: return 1;
    }
}

static size_t tensor_bytes(const Tensor *t) {
    size_t n = dtype_size(t->dtype);
    for (size_t i = 0; i < t->rank; i++) n *= (size_t)t->dims[i];
    return n;
}

static uint32_t u32_at(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t u64_at(const unsigned char *p) { return u32_at(p) | (uint64_t)u32_at(p + 4) << 32; }

/* One MODEL_INOUT_INFO description block: u32 count, then per tensor a
 * 32-byte head {u64 size; i32 format; i32 dtype; u32 name_len, dims_len,
 * dimsV2_len, shape_range_len} and the name, dims, dimsV2, ranges. */
static int parse_tensors(const unsigned char *p, size_t n, Tensor *list, size_t *count) {
    if (n < 4) return -1;
    size_t at = 4, c = u32_at(p);
    if (c > MAX_IO) return -1;
    for (size_t i = 0; i < c; i++) {
        if (at + 32 > n) return -1;
        const unsigned char *h = p + at;
        size_t name_len = u32_at(h + 16), dims_len = u32_at(h + 20);
        size_t rest = name_len + dims_len + u32_at(h + 24) + u32_at(h + 28);
        if (name_len >= 128 || dims_len / 8 > MAX_RANK || at + 32 + rest > n) return -1;
        Tensor *t = &list[i];
        memset(t, 0, sizeof *t);
        t->dtype = (int)u32_at(h + 12);
        memcpy(t->name, h + 32, name_len);
        t->rank = dims_len / 8;
        for (size_t d = 0; d < t->rank; d++) t->dims[d] = (int64_t)u64_at(h + 32 + name_len + 8 * d);
        at += 32 + rest;
    }
    *count = c;
    return 0;
}

/* Protobuf wire reading, just enough for the ModelDef's FileConstants. */
static int pb_varint(const unsigned char *p, size_t n, size_t *at, uint64_t *v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*at >= n) return -1;
        unsigned char c = p[(*at)++];
        *v |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) return 0;
    }
    return -1;
}

/* The next field at *at: 1 with its number (and bytes, if length-delimited),
 * 0 at the end, -1 on malformed input. */
static int pb_next(const unsigned char *p, size_t n, size_t *at, uint64_t *field,
                   const unsigned char **sub, size_t *len) {
    uint64_t key, v;
    if (*at >= n) return 0;
    if (pb_varint(p, n, at, &key)) return -1;
    *field = key >> 3;
    *sub = NULL;
    *len = 0;
    switch (key & 7) {
    case 0: return pb_varint(p, n, at, &v) ? -1 : 1;
    case 1: if (n - *at < 8) return -1; *at += 8; return 1;
    case 5: if (n - *at < 4) return -1; *at += 4; return 1;
    case 2:
        if (pb_varint(p, n, at, &v) || v > n - *at) return -1;
        *sub = p + *at;
        *len = (size_t)v;
        *at += (size_t)v;
        return 1;
    default: return -1;
    }
}

static void add_weight(Model *m, const unsigned char *name, size_t len) {
    if (len == 0 || len >= 128 || m->n_weights >= MAX_WEIGHTS) return;
    for (size_t w = 0; w < m->n_weights; w++)
        if (strlen(m->weights[w]) == len && memcmp(m->weights[w], name, len) == 0) return;
    memcpy(m->weights[m->n_weights], name, len);
    m->weights[m->n_weights][len] = 0;
    m->n_weights++;
}

/* One OpDef: a FileConstant's `location`/`file_path` string attr. */
static int op_weight(const unsigned char *p, size_t n, Model *m) {
    const unsigned char *sub, *file = NULL;
    size_t len, file_len = 0, at = 0;
    uint64_t field;
    int r, is_file_constant = 0;
    while ((r = pb_next(p, n, &at, &field, &sub, &len)) == 1) {
        if (field == 2 && sub) is_file_constant = len == 12 && memcmp(sub, "FileConstant", 12) == 0;
        if (field != 10 || !sub) continue;
        const unsigned char *key = NULL, *value = NULL, *s;
        size_t key_len = 0, value_len = 0, s_len, e = 0, a = 0;
        uint64_t f;
        while ((r = pb_next(sub, len, &e, &f, &s, &s_len)) == 1) {
            if (f == 1 && s) { key = s; key_len = s_len; }
            if (f == 2 && s) { value = s; value_len = s_len; }
        }
        if (r < 0) return -1;
        if (!key || !value) continue;
        int wanted = (key_len == 8 && memcmp(key, "location", 8) == 0) ||
                     (key_len == 9 && memcmp(key, "file_path", 9) == 0);
        if (!wanted) continue;
        while ((r = pb_next(value, value_len, &a, &f, &s, &s_len)) == 1)
            if (f == 2 && s) { file = s; file_len = s_len; }
        if (r < 0) return -1;
    }
    if (r < 0) return -1;
    if (is_file_constant && file) add_weight(m, file, file_len);
    return 0;
}

static int model_def_weights(const unsigned char *p, size_t n, Model *m) {
    const unsigned char *graph, *op;
    size_t graph_len, op_len, at = 0;
    uint64_t field;
    int r;
    while ((r = pb_next(p, n, &at, &field, &graph, &graph_len)) == 1) {
        if (field != 7 || !graph) continue;
        size_t g = 0;
        while ((r = pb_next(graph, graph_len, &g, &field, &op, &op_len)) == 1)
            if (field == 6 && op && op_weight(op, op_len, m)) return -1;
        if (r < 0) return -1;
    }
    return r < 0 ? -1 : 0;
}

/* The .om layout Kiln's reader documents: 256-byte header, partition table
 * (64-bit form when model_length is set), partitions; type 8 holds TLV
 * records, 0 the inputs and 1 the outputs. */
static int parse_om(const unsigned char *b, size_t n, Model *m) {
    if (n < 264) return -1;
    int wide = u64_at(b + 184) != 0;
    size_t num = u32_at(b + 256), entry = wide ? 24 : 12, table = 256 + (wide ? 8 : 4);
    size_t data = table + num * entry;
    if (num < 1 || num > 8 || data > n) return -1;
    /* Like GE's loader, take the partitions' sizes in sequence. */
    for (size_t i = 0, off = 0; i < num; i++) {
        const unsigned char *e = b + table + i * entry;
        size_t size = wide ? u64_at(e + 16) : u32_at(e + 8);
        off += size;
        if (data + off > n) return -1;
        if (u32_at(e) == 0) {
            const unsigned char *p = b + data + off - size;
            if (model_def_weights(p, size, m)) {
                return -1;
            }
            continue;
        }
        if (u32_at(e) != 8) continue;
        const unsigned char *p = b + data + off - size;
        for (size_t at = 0; at + 8 <= size;) {
            uint32_t type = u32_at(p + at), len = u32_at(p + at + 4);
            if (at + 8 + len > size) return -1;
            if (type == 0 && parse_tensors(p + at + 8, len, m->in, &m->n_in)) return -1;
            if (type == 1 && parse_tensors(p + at + 8, len, m->out, &m->n_out)) return -1;
            at += 8 + len;
        }
        if (!m->n_in || !m->n_out) return -1;
    }
    return m->n_in && m->n_out ? 0 : -1;
}

/* Reads weight/<name> beside the .om at `path`; the caller frees. */
static unsigned char *read_weight(const char *path, const char *name, size_t *size) {
    char file[4352];
    const char *slash = strrchr(path, '/');
    int dir_len = slash ? (int)(slash - path) : 1;
    snprintf(file, sizeof file, "%.*s/weight/%s", dir_len, slash ? path : ".", name);
    FILE *f = fopen(file, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    unsigned char *bytes = malloc(n > 0 ? (size_t)n : 1);
    *size = fread(bytes, 1, (size_t)n, f);
    fclose(f);
    return bytes;
}

/* Gives every FileConstant of `m` its memory: a registered buffer, checked,
 * or a copy the loader reads itself. */
static int bind_weights(Model *m, const char *path, const ConfigHandle *config) {
    for (size_t w = 0; w < m->n_weights; w++) {
        size_t size = 0;
        unsigned char *bytes = read_weight(path, m->weights[w], &size);
        if (!bytes) return fail(145000, "test double: %s needs weight/%s, which does not exist", m->file, m->weights[w]);
        const Registration *r = NULL;
        for (size_t i = 0; config && i < config->n_regs; i++) {
            if (strcmp(config->regs[i].name, m->weights[w]) == 0) r = &config->regs[i];
        }
        if (r) {
            int ok = r->size >= size && r->size % 32 == 0 && is_device_memory(r->ptr, r->size) &&
                     memcmp(r->ptr, bytes, size) == 0;
            free(bytes);
            if (!ok) {
                return fail(145000, "test double: the buffer registered for %s is not device memory of a multiple "
                            "of 32 bytes holding the file", m->weights[w]);
            }
            record("weight %s registered for %s", m->weights[w], m->file);
        } else {
            m->loader_copies[w] = bytes;
            record("weight %s read by the loader for %s: %zu bytes", m->weights[w], m->file, size);
        }
    }
    return 0;
}

static int load_model(const char *path, uint32_t *id, const ConfigHandle *config);

int aclmdlLoadFromFile(const char *path, uint32_t *id) {
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    record("aclmdlLoadFromFile %s", base);
    return load_model(path, id, NULL);
}

static int load_model(const char *path, uint32_t *id, const ConfigHandle *config) {
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    const char *refuse = getenv("KILN_ACL_DOUBLE_FAIL_LOAD");
    if (refuse && strcmp(refuse, base) == 0) return fail(100014, "test double: loading %s failed as the test asked", base);
    FILE *f = fopen(path, "rb");
    if (!f) return fail(100003, "test double: cannot open the model file");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    unsigned char *bytes = malloc(n > 0 ? (size_t)n : 1);
    size_t got = fread(bytes, 1, (size_t)n, f);
    fclose(f);
    int slot = -1;
    for (int i = 0; i < MAX_MODELS && slot < 0; i++) {
        if (!models[i].loaded) slot = i;
    }
    if (slot < 0) {
        free(bytes);
        return fail(100012, "test double: too many models");
    }
    Model *m = &models[slot];
    memset(m, 0, sizeof *m);
    snprintf(m->file, sizeof m->file, "%s", base);
    if (got >= 4 && memcmp(bytes, "IMOD", 4) == 0) {
        int bad = parse_om(bytes, got, m);
        free(bytes);
        if (bad) return fail(100013, "test double: %s has no readable MODEL_INOUT_INFO", base);
        m->kiln = strcmp(m->in[0].name, "input_ids") == 0;
    } else {
        free(bytes);
        m->n_in = m->n_out = 1;
        for (int k = 0; k < 2; k++) {
            Tensor *t = k ? &m->out[0] : &m->in[0];
            strcpy(t->name, k ? "y" : "x");
            t->rank = 2;
            t->dims[0] = 1;
            t->dims[1] = 4;
        }
    }
    int bad = bind_weights(m, path, config);
    if (bad) {
        for (size_t w = 0; w < m->n_weights; w++) free(m->loader_copies[w]);
        memset(m, 0, sizeof *m);
        return bad;
    }
    m->loaded = 1;
    live_objects++;
    *id = (uint32_t)slot + 1;
    return 0;
}

#ifndef KILN_DOUBLE_OLD_CANN
void *aclmdlCreateConfigHandle(void) {
    record("aclmdlCreateConfigHandle");
    return object(sizeof(ConfigHandle));
}
int aclmdlDestroyConfigHandle(void *handle) {
    record("aclmdlDestroyConfigHandle");
    release(handle);
    return 0;
}
int aclmdlSetConfigOpt(void *handle, int attr, const void *value, size_t size) {
    ConfigHandle *h = handle;
    if (attr == 1) { /* ACL_MDL_LOAD_TYPE_SIZET */
        if (size != sizeof(size_t)) return fail(100000, "test double: LOAD_TYPE takes a size_t");
        size_t type = *(const size_t *)value;
        if (type < 1 || type > 6) return fail(100000, "test double: load type %zu", type);
        h->load_type = type;
        return 0;
    }
    if (attr == 2) { /* ACL_MDL_PATH_PTR: a pointer to the path's pointer */
        if (size != sizeof(void *)) return fail(100000, "test double: PATH_PTR takes a pointer's size");
        const char *path = *(const char *const *)value;
        if (!path) return fail(100000, "test double: a null path");
        snprintf(h->path, sizeof h->path, "%s", path);
        h->has_path = 1;
        return 0;
    }
    return fail(100000, "test double: config attribute %d is not one Kiln should set", attr);
}
int aclmdlSetExternalWeightAddress(void *handle, const char *name, void *ptr, size_t size) {
    ConfigHandle *h = handle;
    /* Which aclrtMalloc block it is: the tests compare the two models'. */
    int block = -1;
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (allocs[i].ptr == ptr) block = i;
    }
    record("aclmdlSetExternalWeightAddress %s %zu block %d", name, size, block);
    if (size == 0 || size % 32) return fail(100000, "test double: size %zu is not a positive multiple of 32", size);
    if (strchr(name, '/')) return fail(100000, "test double: %s is a path, not a file name", name);
    if (h->n_regs == MAX_WEIGHTS) return fail(100000, "test double: too many registrations");
    Registration *r = &h->regs[h->n_regs++];
    snprintf(r->name, sizeof r->name, "%s", name);
    r->ptr = ptr;
    r->size = size;
    return 0;
}
int aclmdlLoadWithConfig(const void *handle, uint32_t *id) {
    const ConfigHandle *h = handle;
    if (h->load_type != 1 || !h->has_path) return fail(100000, "test double: load from file needs LOAD_TYPE 1 and PATH_PTR");
    const char *base = strrchr(h->path, '/') ? strrchr(h->path, '/') + 1 : h->path;
    record("aclmdlLoadWithConfig %s", base);
    return load_model(h->path, id, h);
}
#endif

int aclmdlQuerySize(const char *path, size_t *work, size_t *weight) {
    (void)path;
    /* A stand-in figure, not a real one: the double has no workspace. */
    *work = 1 << 20;
    *weight = 0;
    return 0;
}

int aclmdlUnload(uint32_t id) {
    Model *m = model_by_id(id);
    record("aclmdlUnload %s", m ? m->file : "?");
    if (!m) return fail(100011, "test double: no such model");
    for (size_t w = 0; w < m->n_weights; w++) free(m->loader_copies[w]);
    m->loaded = 0;
    live_objects--;
    return 0;
}

void *aclmdlCreateDesc(void) { return object(sizeof(Desc)); }
int aclmdlGetDesc(void *desc, uint32_t id) {
    record("aclmdlGetDesc");
    Model *m = model_by_id(id);
    if (!m) return fail(100011, "test double: no such model");
    ((Desc *)desc)->model = m;
    return 0;
}
int aclmdlDestroyDesc(void *desc) { release(desc); return 0; }

static Model *described(const void *desc) { return ((const Desc *)desc)->model; }

size_t aclmdlGetNumInputs(void *desc) { return described(desc)->n_in; }
size_t aclmdlGetNumOutputs(void *desc) { return described(desc)->n_out; }
size_t aclmdlGetInputSizeByIndex(void *desc, size_t i) { return tensor_bytes(&described(desc)->in[i]); }
size_t aclmdlGetOutputSizeByIndex(void *desc, size_t i) { return tensor_bytes(&described(desc)->out[i]); }

static int dims(const Tensor *t, aclmdlIODims *d) {
    memset(d, 0, sizeof *d);
    strcpy(d->name, t->name);
    d->dimCount = t->rank;
    for (size_t i = 0; i < t->rank; i++) d->dims[i] = t->dims[i];
    return 0;
}
int aclmdlGetInputDims(const void *desc, size_t i, aclmdlIODims *d) { return dims(&described(desc)->in[i], d); }
int aclmdlGetOutputDims(const void *desc, size_t i, aclmdlIODims *d) { return dims(&described(desc)->out[i], d); }
int aclmdlGetInputDataType(const void *desc, size_t i) { return described(desc)->in[i].dtype; }
int aclmdlGetOutputDataType(const void *desc, size_t i) { return described(desc)->out[i].dtype; }
const char *aclmdlGetInputNameByIndex(const void *desc, size_t i) { return described(desc)->in[i].name; }
const char *aclmdlGetOutputNameByIndex(const void *desc, size_t i) { return described(desc)->out[i].name; }

/* ---- datasets ---- */

typedef struct {
    void *data;
    size_t size;
} DataBuffer;

typedef struct {
    DataBuffer *buffers[MAX_IO];
    size_t count;
} Dataset;

void *aclmdlCreateDataset(void) { return object(sizeof(Dataset)); }
int aclmdlDestroyDataset(const void *set) { release((void *)set); return 0; }
int aclmdlAddDatasetBuffer(void *set, void *buffer) {
    Dataset *s = set;
    if (s->count == MAX_IO) return fail(100000, "test double: dataset full");
    s->buffers[s->count++] = buffer;
    return 0;
}
void *aclCreateDataBuffer(void *data, size_t size) {
    DataBuffer *b = object(sizeof(DataBuffer));
    b->data = data;
    b->size = size;
    return b;
}
int aclDestroyDataBuffer(const void *buffer) { release((void *)buffer); return 0; }

/* ---- execution ---- */

static float get_float(const void *p, int dtype, size_t i) {
    return dtype == 1 ? (float)((const _Float16 *)p)[i] : ((const float *)p)[i];
}
static void put_float(void *p, int dtype, size_t i, float v) {
    if (dtype == 1) ((_Float16 *)p)[i] = (_Float16)v;
    else ((float *)p)[i] = v;
}
static int64_t get_int(const void *p, int dtype, size_t i) {
    return dtype == 3 ? ((const int32_t *)p)[i] : ((const int64_t *)p)[i];
}

static int find(const Tensor *list, size_t n, const char *prefix) {
    for (size_t i = 0; i < n; i++) {
        if (strncmp(list[i].name, prefix, strlen(prefix)) == 0) return (int)i;
    }
    return -1;
}

/* The value k_new holds for position `pos`, layer l, KV head h, element d
 * (v_new holds its negative). Never 0, so a written slot differs from an
 * untouched one; exact in float16 for the tests' small shapes (larger ones
 * are compared after the same rounding). */
static float kiln_pattern(int64_t pos, int64_t l, int64_t h, int64_t d, int64_t layers, int64_t kv_heads,
                          int64_t head_dim) {
    return (float)(((pos * layers + l) * kv_heads + h) * head_dim + d + 1);
}

static int fake_language_model(const Model *m, const Dataset *in, Dataset *out) {
    int ids = find(m->in, m->n_in, "input_ids"), pos = find(m->in, m->n_in, "position_ids");
    int mask = find(m->in, m->n_in, "attention_mask"), index = find(m->in, m->n_in, "logits_index");
    int kc = find(m->in, m->n_in, "k_cache"), vc = find(m->in, m->n_in, "v_cache");
    int logits = find(m->out, m->n_out, "logits"), kn = find(m->out, m->n_out, "k_new");
    int vn = find(m->out, m->n_out, "v_new");
    if (pos < 0 || mask < 0 || index < 0 || kc < 0 || vc < 0 || logits < 0 || kn < 0 || vn < 0) {
        return fail(100017, "test double: %s lacks one of Kiln's inputs or outputs", m->file);
    }
    const Tensor *cache = &m->in[kc];
    int64_t T = m->in[ids].dims[1], layers = cache->dims[0], kvh = cache->dims[2], L = cache->dims[3];
    int64_t D = cache->dims[4], V = m->out[logits].dims[2];
    const void *id_data = in->buffers[ids]->data, *pos_data = in->buffers[pos]->data;
    const void *mask_data = in->buffers[mask]->data;
    int id_type = m->in[ids].dtype, pos_type = m->in[pos].dtype, mask_type = m->in[mask].dtype;
    int cache_type = cache->dtype;

    /* The past the mask shows the first row: slots [0, past). */
    int64_t past = 0;
    while (past < L && get_float(mask_data, mask_type, (size_t)past) == 0.0f) past++;
    for (int64_t s = past; s < L; s++) {
        if (get_float(mask_data, mask_type, (size_t)s) == 0.0f) {
            return fail(500001, "test double: the mask shows slot %lld after a hidden one", (long long)s);
        }
    }
    if (get_int(pos_data, pos_type, 0) != past) {
        return fail(500001, "test double: position_ids[0] is %lld but the mask shows %lld past slots",
                    (long long)get_int(pos_data, pos_type, 0), (long long)past);
    }
    /* What the model sees in the shown slots must be what k_new/v_new gave. */
    for (int k = 0; k < 2; k++) {
        const void *c = in->buffers[k ? vc : kc]->data;
        for (int64_t l = 0; l < layers; l++)
            for (int64_t h = 0; h < kvh; h++)
                for (int64_t s = 0; s < past; s++)
                    for (int64_t d = 0; d < D; d++) {
                        float want = kiln_pattern(s, l, h, d, layers, kvh, D) * (k ? -1.0f : 1.0f);
                        if (cache_type == 1) want = (float)(_Float16)want; /* as k_new stored it */
                        float got = get_float(c, cache_type, (size_t)((((l * kvh) + h) * L + s) * D + d));
                        if (got != want) {
                            return fail(500001,
                                        "test double: %s layer %lld head %lld slot %lld holds %g, expected %g",
                                        k ? "v_cache" : "k_cache", (long long)l, (long long)h, (long long)s,
                                        got, want);
                        }
                    }
    }
    for (int k = 0; k < 2; k++) {
        void *rows = out->buffers[k ? vn : kn]->data;
        int type = m->out[k ? vn : kn].dtype;
        for (int64_t l = 0; l < layers; l++)
            for (int64_t h = 0; h < kvh; h++)
                for (int64_t t = 0; t < T; t++)
                    for (int64_t d = 0; d < D; d++) {
                        float v = kiln_pattern(get_int(pos_data, pos_type, (size_t)t), l, h, d, layers, kvh, D);
                        put_float(rows, type, (size_t)((((l * kvh) + h) * T + t) * D + d), k ? -v : v);
                    }
    }
    int64_t at = get_int(in->buffers[index]->data, m->in[index].dtype, 0);
    if (at < 0 || at >= T) return fail(500001, "test double: logits_index %lld outside [0, %lld)", (long long)at, (long long)T);
    int64_t target = (7 * get_int(id_data, id_type, (size_t)at) + 3 * get_int(pos_data, pos_type, (size_t)at) + 1) % V;
    for (int64_t v = 0; v < V; v++) {
        put_float(out->buffers[logits]->data, m->out[logits].dtype, (size_t)v, v == target ? 8.0f : -0.25f * (float)(v % 16));
    }
    /* A second, sliding-window mask (attention_mask_local): its first row
     * must show one run of cache slots ending at the past; the run is
     * recorded for the test to judge against the window. */
    int local = find(m->in, m->n_in, "attention_mask_local");
    if (local >= 0) {
        const void *local_data = in->buffers[local]->data;
        int local_type = m->in[local].dtype;
        int64_t first = 0;
        while (first < L && get_float(local_data, local_type, (size_t)first) != 0.0f) first++;
        int64_t end = first;
        while (end < L && get_float(local_data, local_type, (size_t)end) == 0.0f) end++;
        if (first == L) first = end = past;
        if (end != past) {
            return fail(500001, "test double: the local mask shows slots [%lld, %lld) with %lld past",
                        (long long)first, (long long)end, (long long)past);
        }
        record("executed %s past=%lld local=%lld..%lld", m->file, (long long)past, (long long)first,
               (long long)end);
        return 0;
    }
    record("executed %s past=%lld", m->file, (long long)past);
    return 0;
}

int aclmdlExecute(uint32_t id, const void *in, void *out) {
    Model *m = model_by_id(id);
    record("aclmdlExecute %s", m ? m->file : "?");
    if (getenv("KILN_ACL_DOUBLE_FAIL_EXECUTE")) return fail(507011, "test double: execute failed as the test asked");
    if (!m) return fail(100011, "test double: no such model");
    const Dataset *i = in;
    Dataset *o = out;
    if (i->count != m->n_in) return fail(100017, "test double: %zu inputs given, %s has %zu", i->count, m->file, m->n_in);
    if (o->count != m->n_out) return fail(100018, "test double: %zu outputs given, %s has %zu", o->count, m->file, m->n_out);
    for (size_t k = 0; k < m->n_in + m->n_out; k++) {
        const DataBuffer *b = k < m->n_in ? i->buffers[k] : o->buffers[k - m->n_in];
        const Tensor *t = k < m->n_in ? &m->in[k] : &m->out[k - m->n_in];
        if (b->size < tensor_bytes(t) || !is_device_memory(b->data, tensor_bytes(t))) {
            return fail(k < m->n_in ? 100017 : 100018, "test double: the buffer for %s is not %zu bytes of device memory",
                        t->name, tensor_bytes(t));
        }
    }
    if (m->kiln) return fake_language_model(m, i, o);
    const float *x = i->buffers[0]->data;
    float *y = o->buffers[0]->data;
    for (int k = 0; k < 4; k++) y[k] = 2.0f * x[k];
    return 0;
}
