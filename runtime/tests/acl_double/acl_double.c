/*
 * A TEST DOUBLE of AscendCL, built by runtime/tests/acl_double.rs. It is not
 * CANN and runs nothing on an NPU: it exports the ACL functions Kiln calls,
 * records every call in $KILN_ACL_DOUBLE_LOG, and fakes a model with one
 * input "x" and one output "y" (float32 [1, 4]) whose output is its input
 * times two. $KILN_ACL_DOUBLE_FAIL_EXECUTE makes aclmdlExecute fail.
 * At aclFinalize it records how many objects were never released.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int live_objects = 0;
static const char *last_error = NULL;

static void record(const char *call) {
    const char *path = getenv("KILN_ACL_DOUBLE_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "%s\n", call);
    fclose(f);
}

static int fail(int code, const char *message) {
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

typedef struct {
    char name[128];
    size_t dimCount;
    int64_t dims[128];
} aclmdlIODims;

typedef struct {
    void *data;
    size_t size;
} DataBuffer;

typedef struct {
    DataBuffer *buffers[8];
    size_t count;
} Dataset;

int aclInit(const char *config) { (void)config; record("aclInit"); return 0; }

int aclFinalize(void) {
    char line[64];
    record("aclFinalize");
    snprintf(line, sizeof line, "live objects at finalize: %d", live_objects);
    record(line);
    return 0;
}

const char *aclGetRecentErrMsg(void) { return last_error; }

int aclrtGetRunMode(int *mode) { record("aclrtGetRunMode"); *mode = 0; return 0; }
int aclrtGetDeviceCount(uint32_t *count) { *count = 1; return 0; }

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

int aclrtMalloc(void **p, size_t size, int policy) { (void)policy; record("aclrtMalloc"); *p = object(size); return 0; }
int aclrtFree(void *p) { record("aclrtFree"); release(p); return 0; }

int aclrtMemcpy(void *dst, size_t dst_max, const void *src, size_t count, int kind) {
    (void)kind;
    if (count > dst_max) return fail(100000, "test double: copy larger than its destination");
    memcpy(dst, src, count);
    return 0;
}

int aclmdlLoadFromFile(const char *path, uint32_t *id) {
    record("aclmdlLoadFromFile");
    FILE *f = fopen(path, "rb");
    if (!f) return fail(100003, "test double: cannot open the model file");
    fclose(f);
    live_objects++;
    *id = 7;
    return 0;
}
int aclmdlUnload(uint32_t id) { (void)id; record("aclmdlUnload"); live_objects--; return 0; }

void *aclmdlCreateDesc(void) { return object(8); }
int aclmdlGetDesc(void *desc, uint32_t id) { (void)desc; record("aclmdlGetDesc"); return id == 7 ? 0 : fail(100011, "test double: no such model"); }
int aclmdlDestroyDesc(void *desc) { release(desc); return 0; }

size_t aclmdlGetNumInputs(void *desc) { (void)desc; return 1; }
size_t aclmdlGetNumOutputs(void *desc) { (void)desc; return 1; }
size_t aclmdlGetInputSizeByIndex(void *desc, size_t i) { (void)desc; (void)i; return 16; }
size_t aclmdlGetOutputSizeByIndex(void *desc, size_t i) { (void)desc; (void)i; return 16; }

static int dims(aclmdlIODims *d, const char *name) {
    memset(d, 0, sizeof *d);
    strcpy(d->name, name);
    d->dimCount = 2;
    d->dims[0] = 1;
    d->dims[1] = 4;
    return 0;
}
int aclmdlGetInputDims(const void *desc, size_t i, aclmdlIODims *d) { (void)desc; (void)i; return dims(d, "x"); }
int aclmdlGetOutputDims(const void *desc, size_t i, aclmdlIODims *d) { (void)desc; (void)i; return dims(d, "y"); }
int aclmdlGetInputDataType(const void *desc, size_t i) { (void)desc; (void)i; return 0; }
int aclmdlGetOutputDataType(const void *desc, size_t i) { (void)desc; (void)i; return 0; }
const char *aclmdlGetInputNameByIndex(const void *desc, size_t i) { (void)desc; (void)i; return "x"; }
const char *aclmdlGetOutputNameByIndex(const void *desc, size_t i) { (void)desc; (void)i; return "y"; }

void *aclmdlCreateDataset(void) { return object(sizeof(Dataset)); }
int aclmdlDestroyDataset(const void *set) { release((void *)set); return 0; }
int aclmdlAddDatasetBuffer(void *set, void *buffer) {
    Dataset *s = set;
    if (s->count == 8) return fail(100000, "test double: dataset full");
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

int aclmdlExecute(uint32_t id, const void *in, void *out) {
    record("aclmdlExecute");
    if (getenv("KILN_ACL_DOUBLE_FAIL_EXECUTE")) return fail(507011, "test double: execute failed as the test asked");
    if (id != 7) return fail(100011, "test double: no such model");
    const Dataset *i = in;
    Dataset *o = out;
    if (i->count != 1 || o->count != 1) return fail(100017, "test double: expected one input and one output");
    const float *x = i->buffers[0]->data;
    float *y = o->buffers[0]->data;
    for (int k = 0; k < 4; k++) y[k] = 2.0f * x[k];
    return 0;
}
