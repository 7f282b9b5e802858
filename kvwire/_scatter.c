/* kvwire._scatter: byte spans of host memory moved and checked without Python objects,
 * and the CPU codecs' per-element loops (rotated rows, int4a's and int4's key groups).
 *
 * A chunk that carries some of the heads of each token lies in memory as one short span
 * per token (4 heads of 128 bf16 values: 1 KiB, 2,048 of them in a 2 MiB chunk). These
 * functions take such spans as a ``struct iovec`` array (a C-contiguous uint64 array of
 * ``[address, length]`` rows, built by ``rows`` below or by numpy in kvwire/scatter.py) and
 *
 *   crc32c(iov, crc)         -> the CRC32C of the spans' concatenation, continuing ``crc``
 *   crc32c_together(iovs)    -> the CRC32C of each of several span lists that share their
 *                               rows (the heads of each token that each decode rank gets),
 *                               read in one pass over the rows (below)
 *   sendv(fd, iov, timeout)  -> write every span in order (sendmsg, IOV_MAX at a time)
 *   recvv(fd, iov, timeout)  -> read into every span in order (recvmsg, MSG_WAITALL)
 *   copy_out(buffer, iov)    -> copy a buffer to the spans, with stores that bypass the
 *                               cache where the CPU has them (below, copy_streaming)
 *   rows(out, ids, ...)      -> fill ``out`` with the spans of some token rows of a block
 *                               cache (below); the number of rows of ``out`` used
 *   key_encode, key_decode   -> the coded key groups of an int4a window (below)
 *   bit_planes               -> codes to bit planes over channels and back (below)
 *   key_extremes             -> key groups' finite extremes (int4a; below)
 *   rot_stats, rot_quantize,
 *   rot_dequantize           -> the element-wise work of rotated rows (below)
 *   fp8_quantize,
 *   fp8_quantize_spans,
 *   fp8_dequantize           -> fp8 rows encoded (from a buffer, or where they lie) and
 *                               decoded (into a buffer, or into spans) (below)
 *   int4_quantize,
 *   int4_quantize_spans,
 *   int4_key_quantize_spans,
 *   int4_dequantize          -> int4's value groups and key groups encoded (from a buffer,
 *                               or where they lie) and decoded (into a buffer, or spans)
 *
 * all with the GIL released. ``timeout`` is seconds (negative: none), used only when the
 * socket is non-blocking (a Python socket with a timeout). sendv and recvv return the
 * bytes moved; recvv returns fewer than asked only at end of stream. Errors raise OSError.
 *
 * CRC32C (Castagnoli, reflected, as the crc32c package and kvwire's frames compute it):
 * with SSE4.2, spans of equal length are checked three at a time (three independent
 * crc32 streams keep the instruction's pipeline full) and joined with a table that
 * advances a CRC register over ``length`` zero bytes; a long span alone is cut into
 * thirds the same way; short ones go one at a time; without SSE4.2, a byte table. kvwire/scatter.py asks ``hardware()`` before choosing this path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* The codec loops below must round every float operation on its own, as the torch path and
 * the specification do: no fused multiply-add, no reassociation, whatever the flags
 * (setup.py also passes -ffp-contract=off). */
#ifdef __FAST_MATH__
#error "kvwire._scatter needs IEEE float arithmetic: build it without -ffast-math"
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <math.h>
#include <time.h>

#define POLY 0x82F63B78u /* CRC32C, reflected */
#define MAX_IOV 1024     /* Linux's IOV_MAX */

static uint32_t byte_table[256];

static void init_byte_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (POLY & (0u - (c & 1u)));
        byte_table[i] = c;
    }
}

/* The raw register after ``n`` bytes (no inversions). */
static uint32_t crc_bytes_sw(uint32_t reg, const unsigned char *p, size_t n) {
    while (n--) reg = (reg >> 8) ^ byte_table[(reg ^ *p++) & 0xFFu];
    return reg;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static uint32_t crc_bytes_hw(uint32_t reg, const unsigned char *p, size_t n) {
    uint64_t r = reg;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        r = _mm_crc32_u64(r, v);
        p += 8;
        n -= 8;
    }
    uint32_t r32 = (uint32_t)r;
    while (n--) r32 = _mm_crc32_u8(r32, *p++);
    return r32;
}

/* Three spans of ``n`` bytes each, continuing three registers, interleaved. */
__attribute__((target("sse4.2"))) static void crc_three_on(uint32_t reg[3], const unsigned char *a,
                                                          const unsigned char *b, const unsigned char *c, size_t n) {
    uint64_t ra = reg[0], rb = reg[1], rc = reg[2];
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t va, vb, vc;
        memcpy(&va, a + i, 8);
        memcpy(&vb, b + i, 8);
        memcpy(&vc, c + i, 8);
        ra = _mm_crc32_u64(ra, va);
        rb = _mm_crc32_u64(rb, vb);
        rc = _mm_crc32_u64(rc, vc);
    }
    reg[0] = crc_bytes_hw((uint32_t)ra, a + i, n - i);
    reg[1] = crc_bytes_hw((uint32_t)rb, b + i, n - i);
    reg[2] = crc_bytes_hw((uint32_t)rc, c + i, n - i);
}

/* Three spans of ``n`` bytes each, each from a zero register, interleaved. */
static void crc_three_hw(const unsigned char *a, const unsigned char *b, const unsigned char *c, size_t n,
                         uint32_t out[3]) {
    out[0] = out[1] = out[2] = 0;
    crc_three_on(out, a, b, c, n);
}
#else
#define HAVE_X86 0
#endif

static int use_hw = 0;

static uint32_t crc_bytes(uint32_t reg, const unsigned char *p, size_t n) {
#if HAVE_X86
    if (use_hw) return crc_bytes_hw(reg, p, n);
#endif
    return crc_bytes_sw(reg, p, n);
}

#if HAVE_X86
/* Joining CRCs of any lengths: the register after ``n`` more bytes is the register times
 * x^(8n) modulo the polynomial (no table per length). Polynomials are reflected: bit 31
 * is x^0. */
static uint32_t x2n[64]; /* x^(2^k) */

static uint32_t gf2_mul(uint32_t a, uint32_t b) {
    if (a == 0) return 0;
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ POLY : b >> 1;
    }
    return p;
}

static void init_x2n(void) {
    x2n[0] = 1u << 30; /* x^1 */
    for (int k = 1; k < 64; k++) x2n[k] = gf2_mul(x2n[k - 1], x2n[k - 1]);
}

static uint32_t shift_bytes(uint32_t reg, uint64_t n) {
    uint32_t p = 1u << 31; /* x^0 */
    for (int k = 3; n && k < 64; n >>= 1, k++)
        if (n & 1) p = gf2_mul(x2n[k], p);
    return gf2_mul(p, reg);
}

/* Advancing a register over ``n`` zero bytes is linear in the register: four byte tables
 * (one per byte of the register) built from the 32 unit registers. */
typedef struct {
    size_t n;
    uint32_t t[4][256];
} ZeroTable;

static void zero_table_build(ZeroTable *z, size_t n) {
    uint32_t unit[32];
    for (int bit = 0; bit < 32; bit++) unit[bit] = shift_bytes(1u << bit, n);
    for (int k = 0; k < 4; k++)
        for (uint32_t v = 0; v < 256; v++) {
            uint32_t acc = 0;
            for (int bit = 0; bit < 8; bit++)
                if (v & (1u << bit)) acc ^= unit[8 * k + bit];
            z->t[k][v] = acc;
        }
    z->n = n;
}

static inline uint32_t zero_advance(const ZeroTable *z, uint32_t reg) {
    return z->t[0][reg & 0xFF] ^ z->t[1][(reg >> 8) & 0xFF] ^ z->t[2][(reg >> 16) & 0xFF] ^ z->t[3][reg >> 24];
}

/* Tables for the span lengths seen, shared by all threads and never freed (bounded:
 * ZERO_SLOTS of 4 KiB). A slot is published (zero_used raised) only once built, and never
 * changes after; a length beyond the slots is built into the caller's scratch table, in
 * about 6 us here (the units are products, not CRCs of n zero bytes, which cost 32 n bytes
 * of CRC: 4.8 ms a call once 48 lengths had filled the slots, for a 4 MiB buffer). */
#define ZERO_SLOTS 48
static ZeroTable zero_slots[ZERO_SLOTS];
static int zero_used = 0;
static pthread_mutex_t zero_lock = PTHREAD_MUTEX_INITIALIZER;

static const ZeroTable *zero_table_for(size_t n, ZeroTable *scratch) {
    int used = __atomic_load_n(&zero_used, __ATOMIC_ACQUIRE);
    for (int i = 0; i < used; i++)
        if (zero_slots[i].n == n) return &zero_slots[i];
    const ZeroTable *found = NULL;
    pthread_mutex_lock(&zero_lock);
    used = zero_used;
    for (int i = 0; i < used && found == NULL; i++)
        if (zero_slots[i].n == n) found = &zero_slots[i];
    if (found == NULL && used < ZERO_SLOTS) {
        zero_table_build(&zero_slots[used], n);
        __atomic_store_n(&zero_used, used + 1, __ATOMIC_RELEASE);
        found = &zero_slots[used];
    }
    pthread_mutex_unlock(&zero_lock);
    if (found == NULL) {
        zero_table_build(scratch, n);
        found = scratch;
    }
    return found;
}

/* One long span as three interleaved streams too: cut into thirds of a power-of-two
 * multiple of SPLIT_MIN bytes (few distinct lengths, so their zero tables stay in the
 * slots), again on what is left, then the tail one byte stream. A single stream runs
 * at a third of the instruction's throughput (11 against 30 GB/s on 2 MiB here). */
#define SPLIT_MIN 4096
static uint32_t crc_long_hw(uint32_t reg, const unsigned char *p, size_t n) {
    ZeroTable scratch;
    while (n >= 3 * SPLIT_MIN) {
        size_t m = SPLIT_MIN;
        while (6 * m <= n) m *= 2; /* the largest with 3 m <= n */
        const ZeroTable *z = zero_table_for(m, &scratch);
        uint32_t part[3];
        crc_three_hw(p, p + m, p + 2 * m, m, part);
        reg = zero_advance(z, reg) ^ part[0];
        reg = zero_advance(z, reg) ^ part[1];
        reg = zero_advance(z, reg) ^ part[2];
        p += 3 * m;
        n -= 3 * m;
    }
    return crc_bytes_hw(reg, p, n);
}
#endif

static uint32_t crc_iov(uint32_t crc, const struct iovec *iov, size_t count) {
    uint32_t reg = ~crc;
    size_t i = 0;
#if HAVE_X86
    if (use_hw) {
        ZeroTable scratch;
        const ZeroTable *z = NULL;
        while (i + 3 <= count) {
            size_t n = iov[i].iov_len;
            if (n < 64 || iov[i + 1].iov_len != n || iov[i + 2].iov_len != n) {
                reg = crc_long_hw(reg, iov[i].iov_base, n);
                i++;
                continue;
            }
            if (z == NULL || z->n != n) z = zero_table_for(n, &scratch);
            uint32_t part[3];
            crc_three_hw(iov[i].iov_base, iov[i + 1].iov_base, iov[i + 2].iov_base, n, part);
            reg = zero_advance(z, reg) ^ part[0];
            reg = zero_advance(z, reg) ^ part[1];
            reg = zero_advance(z, reg) ^ part[2];
            i += 3;
        }
        for (; i < count; i++) reg = crc_long_hw(reg, iov[i].iov_base, iov[i].iov_len);
    }
#endif
    for (; i < count; i++) reg = crc_bytes(reg, iov[i].iov_base, iov[i].iov_len);
    return ~reg;
}


/* The CRC32C of each of ``lists`` span lists of ``count`` spans, where span ``t`` of every
 * list lies in the same row of memory (several decode ranks' heads of one token). Checked
 * one list after another, each pass reads half rows (or less), which this machine's
 * prefetching serves at about half the speed of whole ones (12-13 against 25-27 GB/s out
 * of main memory, bench/span_memory.py); here the rows are read once, whole: three
 * streams a third of the rows apart (three streams a span apart were no faster than one
 * list at a time), every list's span of a row in turn, each list's three partial CRCs
 * joined at the end. Lists whose spans are not all one length go one at a time. */
#define TOGETHER_MAX 8
static void crc_together(struct iovec *const *iov, size_t lists, size_t count, uint32_t *out) {
    int even = 1;
    for (size_t j = 0; j < lists && even; j++)
        for (size_t t = 1; t < count && even; t++) even = iov[j][t].iov_len == iov[j][0].iov_len;
#if HAVE_X86
    if (use_hw && even && count >= 3) {
        size_t m = count / 3;
        uint32_t reg[TOGETHER_MAX][3] = {{0}};
        for (size_t t = 0; t < m; t++)
            for (size_t j = 0; j < lists; j++)
                crc_three_on(reg[j], iov[j][t].iov_base, iov[j][m + t].iov_base, iov[j][2 * m + t].iov_base,
                             iov[j][0].iov_len);
        for (size_t j = 0; j < lists; j++) {
            uint64_t third = (uint64_t)m * iov[j][0].iov_len;
            uint32_t r = 0xFFFFFFFFu;
            for (int s = 0; s < 3; s++) r = shift_bytes(r, third) ^ reg[j][s];
            for (size_t t = 3 * m; t < count; t++) r = crc_bytes_hw(r, iov[j][t].iov_base, iov[j][t].iov_len);
            out[j] = ~r;
        }
        return;
    }
#endif
    for (size_t j = 0; j < lists; j++) out[j] = crc_iov(0, iov[j], count);
}

/* The iovec rows of a buffer argument: C-contiguous, 16 bytes a row (8-byte address, 8-byte length). */
static int get_iov(PyObject *obj, Py_buffer *view, struct iovec **iov, size_t *count) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (sizeof(struct iovec) != 16 || view->len % 16 != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "iov: expected a C-contiguous uint64 array of [address, length] rows");
        return -1;
    }
    *iov = (struct iovec *)view->buf;
    *count = (size_t)view->len / 16;
    return 0;
}

static PyObject *py_crc32c(PyObject *self, PyObject *args) {
    PyObject *obj;
    unsigned long crc = 0;
    if (!PyArg_ParseTuple(args, "O|k", &obj, &crc)) return NULL;
    Py_buffer view;
    struct iovec *iov;
    size_t count;
    if (get_iov(obj, &view, &iov, &count) < 0) return NULL;
    uint32_t out;
    Py_BEGIN_ALLOW_THREADS out = crc_iov((uint32_t)crc, iov, count);
    Py_END_ALLOW_THREADS PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(out);
}

/* One contiguous buffer (bytes, memoryview, numpy array...), the GIL released: on data
 * that must come from main memory, as a sender's cache rows do, the three streams a third
 * apart of crc_long_hw ran at 17-27 GB/s where a CRC taking the buffer front to back
 * read 8-15 (bench/checksum_speed.py, 2-4 MiB buffers). */
static PyObject *py_crc32c_buffer(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned long crc = 0;
    if (!PyArg_ParseTuple(args, "y*|k", &view, &crc)) return NULL;
    struct iovec one = {view.buf, (size_t)view.len};
    uint32_t out;
    Py_BEGIN_ALLOW_THREADS out = crc_iov((uint32_t)crc, &one, 1);
    Py_END_ALLOW_THREADS PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(out);
}

static PyObject *py_crc32c_together(PyObject *self, PyObject *args) {
    PyObject *arg;
    if (!PyArg_ParseTuple(args, "O", &arg)) return NULL;
    if (!PyList_Check(arg) && !PyTuple_Check(arg))
        return PyErr_Format(PyExc_TypeError, "crc32c_together: expected a list or tuple of iov arrays, got %s",
                            Py_TYPE(arg)->tp_name);
    PyObject *seq = PySequence_Tuple(arg); /* a copy: the caller's list may not change under us */
    if (seq == NULL) return NULL;
    Py_ssize_t lists = PyTuple_GET_SIZE(seq);
    if (lists < 1 || lists > TOGETHER_MAX) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "crc32c_together: expected 1 to %d iov arrays, got %zd", TOGETHER_MAX,
                            lists);
    }
    Py_buffer views[TOGETHER_MAX];
    struct iovec *iov[TOGETHER_MAX];
    size_t count[TOGETHER_MAX];
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    for (; got < lists; got++)
        if (get_iov(PyTuple_GET_ITEM(seq, got), &views[got], &iov[got], &count[got]) < 0) goto done;
    for (Py_ssize_t j = 1; j < lists; j++)
        if (count[j] != count[0]) {
            PyErr_Format(PyExc_ValueError, "crc32c_together: iov array %zd has %zu spans, the first %zu", j, count[j],
                         count[0]);
            goto done;
        }
    uint32_t out[TOGETHER_MAX];
    Py_BEGIN_ALLOW_THREADS crc_together(iov, (size_t)lists, count[0], out);
    Py_END_ALLOW_THREADS result = PyTuple_New(lists);
    if (result == NULL) goto done;
    for (Py_ssize_t j = 0; j < lists; j++) {
        PyObject *v = PyLong_FromUnsignedLong(out[j]);
        if (v == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyTuple_SET_ITEM(result, j, v);
    }
done:
    for (Py_ssize_t j = 0; j < got; j++) PyBuffer_Release(&views[j]);
    Py_DECREF(seq);
    return result;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Wait until ``fd`` is ready for ``events`` or the deadline passes (-1: none): 0, or an
 * errno. EINTR is returned only when ``interruptible``; otherwise the wait goes on. */
static int wait_ready(int fd, short events, double deadline, int interruptible) {
    for (;;) {
        int ms = -1;
        if (deadline >= 0) {
            double left = deadline - now_s();
            if (left <= 0) return ETIMEDOUT;
            ms = left < 86400.0 ? (int)(left * 1000) + 1 : 86400000; /* a day at a time: no int overflow */
        }
        struct pollfd p = {fd, events, 0};
        int r = poll(&p, 1, ms);
        if (r > 0) return 0;
        if (r == 0) continue; /* the deadline is checked above */
        if (errno != EINTR || interruptible) return errno;
    }
}

/* Move every byte of ``iov`` (a private copy: partial transfers advance it, and the spans
 * done are left empty, so a call that returned EINTR can be made again to go on) before
 * ``deadline`` (-1: none). ``*moved`` counts the bytes this call moved. EINTR is returned
 * only when ``interruptible``: the reader threads of the receive lane, where Python runs
 * no signal handler, go on; the main thread must run its handlers (PEP 475). */
static int move_all(int fd, struct iovec *iov, size_t count, int sending, double deadline, size_t *moved,
                    int interruptible) {
    size_t i = 0;
    *moved = 0;
    while (i < count && iov[i].iov_len == 0) i++;
    while (i < count) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov + i;
        msg.msg_iovlen = count - i < MAX_IOV ? count - i : MAX_IOV;
        ssize_t n = sending ? sendmsg(fd, &msg, MSG_NOSIGNAL) : recvmsg(fd, &msg, MSG_WAITALL);
        if (n < 0) {
            if (errno == EINTR) {
                if (interruptible) return EINTR;
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int err = wait_ready(fd, sending ? POLLOUT : POLLIN, deadline, interruptible);
                if (err) return err;
                continue;
            }
            return errno;
        }
        if (n == 0 && !sending) return 0; /* end of stream: the caller sees fewer bytes */
        *moved += (size_t)n;
        size_t left = (size_t)n;
        while (i < count && left >= iov[i].iov_len) {
            left -= iov[i].iov_len;
            iov[i].iov_len = 0;
            i++;
        }
        if (left) {
            iov[i].iov_base = (char *)iov[i].iov_base + left;
            iov[i].iov_len -= left;
        }
        while (i < count && iov[i].iov_len == 0) i++;
    }
    return 0;
}

static PyObject *move(PyObject *args, int sending) {
    int fd;
    PyObject *obj;
    double timeout = -1;
    if (!PyArg_ParseTuple(args, "iO|d", &fd, &obj, &timeout)) return NULL;
    Py_buffer view;
    struct iovec *given;
    size_t count;
    if (get_iov(obj, &view, &given, &count) < 0) return NULL;
    struct iovec *iov = PyMem_RawMalloc(count ? count * sizeof(struct iovec) : 1);
    if (iov == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    memcpy(iov, given, count * sizeof(struct iovec));
    double deadline = timeout >= 0 ? now_s() + timeout : -1;
    size_t moved = 0;
    int err;
    for (;;) { /* a signal's handler runs between the tries, and an error it raises is this call's */
        size_t part = 0;
        Py_BEGIN_ALLOW_THREADS err = move_all(fd, iov, count, sending, deadline, &part, 1);
        Py_END_ALLOW_THREADS moved += part;
        if (err != EINTR) break;
        if (PyErr_CheckSignals() < 0) break;
    }
    PyMem_RawFree(iov);
    PyBuffer_Release(&view);
    if (err == EINTR) return NULL;
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSize_t(moved);
}

static PyObject *py_sendv(PyObject *self, PyObject *args) { return move(args, 1); }
static PyObject *py_recvv(PyObject *self, PyObject *args) { return move(args, 0); }

static PyObject *py_hardware(PyObject *self, PyObject *unused) { return PyBool_FromLong(use_hw); }

/* Where a selection's token rows lie in a block cache (``rows`` below says how). */
typedef struct {
    uint64_t address;
    Py_ssize_t num_blocks, block_stride, row_stride, span, block_size;
} RowsGeometry;

/* Fill ``o`` (``capacity`` [address, length] rows) with the spans of tokens [start, start +
 * count) of the selection ``id`` (``n_ids`` blocks in token order); how many rows it used,
 * or -1 with ``*why`` set (and ``*bad``, the block id, if it names one). The geometry must have been checked (rows_geometry_ok). */
static Py_ssize_t rows_fill(const RowsGeometry *g, const int64_t *id, Py_ssize_t n_ids, Py_ssize_t start,
                            Py_ssize_t count, uint64_t *o, Py_ssize_t capacity, const char **why, int64_t *bad) {
    int whole_rows = g->span == g->row_stride;
    Py_ssize_t n = 0, t = start, end = start + count;
    if ((end - 1) / g->block_size >= n_ids) {
        *why = "rows: out must be uint64 [n, 2], ids int64 covering every token";
        return -1;
    }
    while (t < end) {
        Py_ssize_t position = t / g->block_size, offset = t % g->block_size;
        int64_t block = id[position];
        if (block < 0 || block >= g->num_blocks) {
            *why = "rows: block id %lld outside 0..%zd";
            *bad = block;
            return -1;
        }
        Py_ssize_t here = g->block_size - offset < end - t ? g->block_size - offset : end - t;
        uint64_t base = g->address + (uint64_t)block * (uint64_t)g->block_stride +
                        (uint64_t)offset * (uint64_t)g->row_stride;
        if (whole_rows) { /* the rows of a block follow each other: one span, joined to the last if adjacent */
            uint64_t length = (uint64_t)here * (uint64_t)g->row_stride;
            if (n && o[2 * n - 2] + o[2 * n - 1] == base) {
                o[2 * n - 1] += length;
            } else {
                if (n == capacity) goto full;
                o[2 * n] = base;
                o[2 * n + 1] = length;
                n++;
            }
        } else {
            for (Py_ssize_t k = 0; k < here; k++) {
                if (n == capacity) goto full;
                o[2 * n] = base + (uint64_t)k * (uint64_t)g->row_stride;
                o[2 * n + 1] = (uint64_t)g->span;
                n++;
            }
        }
        t += here;
    }
    return n;
full:
    *why = "rows: out has too few rows for these spans";
    return -1;
}

static int rows_geometry_ok(const RowsGeometry *g, Py_ssize_t start, Py_ssize_t count) {
    /* in this order, so that no product or sum below can overflow */
    return !(g->block_size <= 0 || g->span <= 0 || g->span > g->row_stride ||
             g->row_stride > g->block_stride / g->block_size || start < 0 || count <= 0 ||
             count > PY_SSIZE_T_MAX - start || g->num_blocks <= 0);
}

/* rows(out, ids, address, num_blocks, block_stride, row_stride, span, block_size, start, count)
 *
 * Tokens [start, start + count) of a selection whose blocks, in token order, are ``ids``
 * (C-contiguous int64), in a cache at ``address`` of ``num_blocks`` blocks, ``block_stride``
 * bytes apart, each holding ``block_size`` token rows ``row_stride`` bytes apart, of which
 * the first ``span`` bytes travel. Writes [address, length] rows into ``out`` (C-contiguous
 * uint64 [n, 2]): one per token, or, where a row is all of its stride, one per run of rows
 * that follow each other in memory (a block, or consecutive blocks). Returns how many rows
 * it wrote. Every block id and position is checked, so no span leaves the cache. */
static PyObject *py_rows(PyObject *self, PyObject *args) {
    PyObject *out_obj, *ids_obj;
    unsigned long long address;
    Py_ssize_t num_blocks, block_stride, row_stride, span, block_size, start, count;
    if (!PyArg_ParseTuple(args, "OOKnnnnnnn", &out_obj, &ids_obj, &address, &num_blocks, &block_stride, &row_stride,
                          &span, &block_size, &start, &count))
        return NULL;
    RowsGeometry checked = {address, num_blocks, block_stride, row_stride, span, block_size};
    if (!rows_geometry_ok(&checked, start, count)) {
        PyErr_SetString(PyExc_ValueError, "rows: inconsistent geometry (sizes, strides, start or count)");
        return NULL;
    }
    Py_buffer out, ids;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return NULL;
    if (PyObject_GetBuffer(ids_obj, &ids, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    PyObject *result = NULL;
    const char *why = NULL;
    int64_t bad = -1;
    if (out.len % 16 || ids.len % 8) {
        PyErr_SetString(PyExc_ValueError, "rows: out must be uint64 [n, 2], ids int64 covering every token");
        goto done;
    }
    Py_ssize_t n = rows_fill(&checked, (const int64_t *)ids.buf, ids.len / 8, start, count, (uint64_t *)out.buf,
                             out.len / 16, &why, &bad);
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, why, (long long)bad, num_blocks - 1);
        goto done;
    }
    result = PyLong_FromSsize_t(n);
done:
    PyBuffer_Release(&ids);
    PyBuffer_Release(&out);
    return result;
}

/* ---- The receive lane ------------------------------------------------------------------
 *
 * lane_recv(fd, head, lanes, lock, batch, max_payload, checked, counters, stream=None, conn=None,
 *           bounce=None) -> (status, lane, received, owed, error)
 *
 * The receiver's frame loop for the frames that need no Python (kvwire/engine/lane.py):
 * raw DATA of a bound request, received in place. It reads a frame header into ``head``
 * (a writable 32-byte buffer). When the frame is a well-formed DATA frame of a tag in
 * ``lanes`` (a dict: tag -> Lane) whose lane is live, its layer and tensor are ones this
 * sender's part carries, its rows lie inside the plan and on its grid, its length is what
 * those raw rows take, and none of its rows was claimed before, the lane claims the rows
 * (as RequestPlan.claim does), receives the payload into the destination rows (given a
 * non-empty ``bounce``, a writable buffer, through it a piece at a time: recv_bounced;
 * else straight in), checks its CRC32C (``checked``), counts it, and reads the next
 * header. Anything else goes back to Python, which handles it as it handles every frame
 * (and names what is wrong with it). ``status``:
 *
 *   LANE_PYTHON    ``head`` holds a header the lane does not take: Python reads that frame
 *   LANE_HANDOFF   the frame in ``head`` was written, verified and counted, and its layer
 *                  may now be ready or its request no longer live: Python finishes the write
 *                  (its claim stands and the layer's writing count still includes it)
 *   LANE_CHECKSUM  the frame's payload failed its checksum; its rows are still claimed
 *   LANE_LOST      the stream ended or failed (``error``: the errno, 0 at end of stream);
 *                  ``lane`` is the lane whose rows it was receiving, with the claim standing,
 *                  or None between frames
 *   LANE_CREDIT    ``owed`` reached ``batch``: Python returns it to the sender as credit
 *                  (given the ``stream``, the lane sends the CREDIT frame itself when that
 *                  needs no waiting, lane_send_credit, and returns for it only otherwise)
 *   LANE_FAILED    a Python error (out of memory, a bug) while the frame in ``head`` had its
 *                  rows claimed: ``error`` is the exception; Python undoes the claim, as for
 *                  LANE_LOST, and raises it. An error with no claim standing is raised here.
 *
 * ``received``: bytes read from the stream; ``owed``: payload bytes consumed (every one is
 * owed back as credit, whatever became of it). Given ``conn`` (the receiver's connection:
 * ``owed``, ``owed_lock``), what the lane owes joins the connection's count before the lane
 * waits for the next frame (pool_owed). ``lock`` is the receiver's lock: the lane
 * looks at a request's tables only while holding it, as Python does; the reads from the
 * socket run with neither the lock nor the GIL.
 *
 * A Lane's ``table`` (int64) is a header, LANE_HEAD values (below), then one entry of
 * LANE_FIELDS values per (layer, tensor) position; the addresses in it are of arrays the
 * Lane keeps alive (the plan's coverage, the selection's block ids, the caches). */
enum { LANE_PYTHON, LANE_HANDOFF, LANE_CHECKSUM, LANE_LOST, LANE_CREDIT, LANE_FAILED };
enum { L_LIVE, L_LAYERS, L_TENSORS, L_IDS, L_NIDS, L_MISSING, L_WRITING, LANE_HEAD = 8 };
enum {
    E_ENABLED, E_ROWS, E_UNIT, E_WEIGHT, E_ADDRESS, E_NUM_BLOCKS, E_BLOCK_STRIDE, E_ROW_STRIDE, E_SPAN,
    E_BLOCK_SIZE, E_COVERED, E_COUNTS, LANE_FIELDS
};
#define FRAME_HEADER 32
#define FRAME_MAGIC 0x4B57
#define FRAME_DATA 7
#define DATA_RAW 0x01

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

typedef struct {
    uint32_t tag, start, count, length, crc;
    unsigned layer, tensor;
} DataHeader;

/* Whether ``h`` is a well-formed DATA header (the checks parse_header makes) of at most
 * ``max_payload`` bytes; its fields in ``d``. */
static int data_header(const unsigned char *h, Py_ssize_t max_payload, DataHeader *d) {
    if ((h[0] | h[1] << 8) != FRAME_MAGIC || h[2] != FRAME_DATA || (h[3] & ~DATA_RAW) || h[11]) return 0;
    struct iovec body = {(void *)h, 28};
    if (crc_iov(0, &body, 1) != le32(h + 28)) return 0;
    d->tag = le32(h + 4);
    d->layer = h[8] | h[9] << 8;
    d->tensor = h[10];
    d->start = le32(h + 12);
    d->count = le32(h + 16);
    d->length = le32(h + 20);
    d->crc = le32(h + 24);
    return d->length > 0 && d->length <= (uint64_t)max_payload;
}

static int add_to(PyObject *target, const char *name, long long delta, int item) {
    PyObject *key = PyUnicode_FromString(name), *value = NULL, *sum = NULL, *by = PyLong_FromLongLong(delta);
    int rc = -1;
    if (key == NULL || by == NULL) goto done;
    value = item ? PyObject_GetItem(target, key) : PyObject_GetAttr(target, key);
    if (value == NULL) goto done;
    sum = PyNumber_Add(value, by);
    if (sum == NULL) goto done;
    rc = item ? PyObject_SetItem(target, key, sum) : PyObject_SetAttr(target, key, sum);
done:
    Py_XDECREF(key);
    Py_XDECREF(value);
    Py_XDECREF(sum);
    Py_XDECREF(by);
    return rc;
}

/* A written, verified chunk counted where Python counts one (the handle's statistics; its
 * first byte's time is the request's, stamped when Python read the request's first header,
 * which never comes through the lane). */
static int count_chunk(PyObject *lane, long long nbytes) {
    PyObject *handle = PyObject_GetAttrString(lane, "handle");
    if (handle == NULL) return -1;
    int rc = -1;
    if (add_to(handle, "chunks", 1, 0) < 0 || add_to(handle, "wire_bytes", nbytes, 0) < 0 ||
        add_to(handle, "logical_bytes", nbytes, 0) < 0)
        goto done;
    rc = 0;
done:
    Py_DECREF(handle);
    return rc;
}

static int call_lock(PyObject *lock, const char *method) {
    PyObject *r = PyObject_CallMethod(lock, method, NULL);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* Under the lock: the lane of ``d`` and the entry its frame lands in, its rows claimed and its
 * destination spans in ``iov`` (``*spans`` of them), or 0 when the lane does not take it. */
static int lane_claim(PyObject *lanes, const DataHeader *d, PyObject **lane_out, Py_buffer *table,
                      struct iovec **iov, size_t *iov_cap, size_t *spans) {
    PyObject *tag = PyLong_FromUnsignedLong(d->tag);
    if (tag == NULL) return -1;
    PyObject *lane = PyDict_GetItemWithError(lanes, tag);
    Py_DECREF(tag);
    if (lane == NULL) return PyErr_Occurred() ? -1 : 0;
    PyObject *table_obj = PyObject_GetAttrString(lane, "table");
    if (table_obj == NULL) return -1;
    int got = PyObject_GetBuffer(table_obj, table, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE);
    Py_DECREF(table_obj);
    if (got < 0) return -1;
    int64_t *t = (int64_t *)table->buf;
    Py_ssize_t n = table->len / 8;
    if (n < LANE_HEAD || !t[L_LIVE] || d->layer >= t[L_LAYERS] || d->tensor >= t[L_TENSORS]) goto no;
    Py_ssize_t at = LANE_HEAD + ((Py_ssize_t)d->layer * t[L_TENSORS] + d->tensor) * LANE_FIELDS;
    if (at + LANE_FIELDS > n) goto no;
    int64_t *e = t + at;
    int64_t start = d->start, count = d->count, rows = e[E_ROWS], unit = e[E_UNIT];
    if (!e[E_ENABLED] || count <= 0 || start + count > rows || start % unit ||
        ((start + count) % unit && start + count != rows) || (int64_t)d->length != count * e[E_SPAN])
        goto no;
    int64_t first = start / unit, last = (start + count + unit - 1) / unit;
    unsigned char *covered = (unsigned char *)(uintptr_t)e[E_COVERED];
    for (int64_t u = first; u < last; u++)
        if (covered[u]) goto no; /* a repeat or an overlap: Python tells which */
    if ((size_t)count > *iov_cap) {
        struct iovec *bigger = PyMem_RawRealloc(*iov, 2 * (size_t)count * sizeof(struct iovec));
        if (bigger == NULL) {
            PyBuffer_Release(table);
            PyErr_NoMemory();
            return -1;
        }
        *iov = bigger;
        *iov_cap = (size_t)count;
    }
    RowsGeometry g = {(uint64_t)e[E_ADDRESS], e[E_NUM_BLOCKS], e[E_BLOCK_STRIDE], e[E_ROW_STRIDE], e[E_SPAN],
                      e[E_BLOCK_SIZE]};
    const char *why;
    int64_t bad;
    if (!rows_geometry_ok(&g, start, count)) goto no;
    Py_ssize_t made = rows_fill(&g, (const int64_t *)(uintptr_t)t[L_IDS], t[L_NIDS], start, count,
                                (uint64_t *)*iov, (Py_ssize_t)*iov_cap, &why, &bad);
    if (made < 0) goto no; /* Python's own path finds the same fault and names it */
    memset(covered + first, 1, (size_t)(last - first));
    ((int64_t *)(uintptr_t)e[E_COUNTS])[first] = count;
    ((int64_t *)(uintptr_t)t[L_MISSING])[d->layer] -= (last - first) * e[E_WEIGHT];
    ((int64_t *)(uintptr_t)t[L_WRITING])[d->layer] += 1;
    *spans = (size_t)made;
    Py_INCREF(lane);
    *lane_out = lane;
    return 1;
no:
    PyBuffer_Release(table);
    return 0;
}

/* A payload received into short spans (half rows, when the decode rank holds more heads
 * than the sender) and checked piece by piece, each piece's CRC32C computed right after
 * its recvmsg. Checked after all 4 MiB had landed, 1 KiB half rows read back at 10-13
 * GB/s, as if from main memory; 256 KiB at a time, at 18-22. Spans of 32 KiB (whole rows,
 * a block each) read back at 19-25 either way (bench/checksum_speed.py --received), and
 * stay checked after the whole payload, in one recvmsg per MAX_IOV spans. ``piece`` has
 * room for 2 * MAX_IOV entries. */
#define CHECK_PIECE (256 * 1024)
#define SHORT_SPAN 4096 /* spans this long on average, or shorter, are checked piece by piece */
static int recv_checked(int fd, const struct iovec *iov, size_t spans, struct iovec *piece, size_t *moved,
                        uint32_t *crc) {
    struct iovec *copy = piece + MAX_IOV; /* move_all advances its copy */
    size_t i = 0, off = 0;
    uint32_t c = 0;
    *moved = 0;
    while (i < spans) {
        size_t k = 0, bytes = 0;
        while (i < spans && bytes < CHECK_PIECE && k < MAX_IOV) {
            size_t take = iov[i].iov_len - off;
            if (take > CHECK_PIECE - bytes) take = CHECK_PIECE - bytes;
            piece[k].iov_base = (char *)iov[i].iov_base + off;
            piece[k].iov_len = take;
            k++;
            bytes += take;
            off += take;
            if (off == iov[i].iov_len) {
                i++;
                off = 0;
            }
        }
        memcpy(copy, piece, k * sizeof *piece);
        size_t got = 0;
        int err = move_all(fd, copy, k, 0, -1, &got, 0);
        *moved += got;
        if (err || got < bytes) return err;
        c = crc_iov(c, piece, k);
    }
    *crc = c;
    return 0;
}

/* Copy ``n`` bytes to ``d`` with stores that bypass the cache (x86-64: SSE2's, on every
 * such CPU), for a destination nobody reads soon (a decode rank's cache rows). An ordinary
 * copy first reads each destination line it writes (the line must be owned before it is
 * written): from a buffer in cache into half rows (1 KiB spans 2 KiB apart) of a 1 GiB
 * buffer, memcpy moved 4.9-5.0 GB/s here, into whole rows 9.6-10.1, where these stores
 * moved 20.6-22.6 either way (a throwaway program: docs/benchmarks.md, "Receiving through
 * a bounce buffer"). The caller fences (store_fence) before the rows may be read by
 * another thread. */
static void copy_streaming(unsigned char *d, const unsigned char *s, size_t n) {
#if HAVE_X86
    if (n >= 128) {
        size_t head = (64 - ((uintptr_t)d & 63)) & 63; /* whole lines streamed: none read, none half written */
        memcpy(d, s, head);
        d += head, s += head, n -= head;
        for (; n >= 64; d += 64, s += 64, n -= 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)s), b = _mm_loadu_si128((const __m128i *)(s + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(s + 32)), e = _mm_loadu_si128((const __m128i *)(s + 48));
            _mm_stream_si128((__m128i *)d, a);
            _mm_stream_si128((__m128i *)(d + 16), b);
            _mm_stream_si128((__m128i *)(d + 32), c);
            _mm_stream_si128((__m128i *)(d + 48), e);
        }
    }
#endif
    memcpy(d, s, n);
}

static void store_fence(void) {
#if HAVE_X86
    _mm_sfence();
#endif
}

/* A place in a list of spans: span ``i``, ``off`` bytes in. */
typedef struct {
    const struct iovec *iov;
    size_t i, off;
} SpanCursor;

/* The next ``n`` bytes of the spans from ``at`` on (there must be that many) get ``src``,
 * copied with copy_streaming; ``at`` moves past them. */
static void spill(SpanCursor *at, const unsigned char *src, size_t n) {
    size_t done = 0;
    while (done < n) {
        size_t take = at->iov[at->i].iov_len - at->off;
        if (take > n - done) take = n - done;
        copy_streaming((unsigned char *)at->iov[at->i].iov_base + at->off, src + done, take);
        done += take;
        at->off += take;
        if (at->off == at->iov[at->i].iov_len) at->i++, at->off = 0;
    }
}

/* The optional ``spans`` argument of the decoders: an iov array and the bytes it takes
 * (none: ``given`` 0, no spans). */
typedef struct {
    Py_buffer view;
    struct iovec *iov;
    size_t count, total;
    int given;
} OutSpans;

static int out_spans_get(PyObject *obj, OutSpans *out) {
    memset(out, 0, sizeof *out);
    if (obj == Py_None) return 0;
    if (get_iov(obj, &out->view, &out->iov, &out->count) < 0) return -1;
    out->given = 1;
    for (size_t i = 0; i < out->count; i++) { /* at most PY_SSIZE_T_MAX: no sum wraps, every size fits */
        if (out->iov[i].iov_len > (size_t)PY_SSIZE_T_MAX - out->total) {
            PyErr_Format(PyExc_ValueError, "spans: more than %zd bytes in all (span %zu)", PY_SSIZE_T_MAX, i);
            PyBuffer_Release(&out->view);
            out->given = 0;
            return -1;
        }
        out->total += out->iov[i].iov_len;
    }
    return 0;
}

static void out_spans_release(OutSpans *out) {
    if (out->given) PyBuffer_Release(&out->view);
    out->given = 0;
}

/* Receive a payload for ``spans`` through ``bounce`` (``room`` bytes, small enough to stay
 * in the core's cache): a piece at a time, the kernel copies it into the bounce buffer
 * (in cache: no destination line is read first), its CRC32C is taken there, and it is
 * copied out to the spans with copy_streaming. Against receiving straight into cold rows
 * and checking them there, the receiving thread's CPU per GB went from 0.228 to 0.213 s
 * into whole rows and from 0.391 to 0.245 into half rows (python3 bench/receive_copy.py,
 * second round). A piece cut short by a lost stream is not copied out: its rows are
 * received again anyway. */
static int recv_bounced(int fd, const struct iovec *iov, size_t spans, unsigned char *bounce, size_t room,
                        int checked, size_t *moved, uint32_t *crc) {
    size_t left = 0;
    SpanCursor at = {iov, 0, 0};
    uint32_t c = 0;
    int err = 0;
    for (size_t j = 0; j < spans; j++) left += iov[j].iov_len;
    *moved = 0;
    while (left > 0) {
        size_t want = left < room ? left : room, got = 0;
        struct iovec one = {bounce, want}; /* move_all advances it */
        err = move_all(fd, &one, 1, 0, -1, &got, 0);
        *moved += got;
        if (err || got < want) break;
        if (checked) {
            struct iovec piece = {bounce, want};
            c = crc_iov(c, &piece, 1);
        }
        spill(&at, bounce, want);
        left -= want;
    }
    store_fence();
    *crc = c;
    return err;
}

/* copy_out(buffer, iov): the buffer's bytes to the spans, in order, with copy_streaming;
 * the spans must take exactly the buffer's length. The GIL is released. */
static PyObject *py_copy_out(PyObject *self, PyObject *args) {
    PyObject *obj;
    Py_buffer data;
    OutSpans spans;
    if (!PyArg_ParseTuple(args, "y*O", &data, &obj)) return NULL;
    if (obj == Py_None || out_spans_get(obj, &spans) < 0) {
        if (obj == Py_None) PyErr_SetString(PyExc_TypeError, "copy_out: spans, not None");
        PyBuffer_Release(&data);
        return NULL;
    }
    const size_t total = spans.total;
    if (total != (size_t)data.len) {
        out_spans_release(&spans);
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "copy_out: the spans take %zu bytes, the buffer holds %zd", total,
                            data.len);
    }
    Py_BEGIN_ALLOW_THREADS SpanCursor at = {spans.iov, 0, 0};
    spill(&at, data.buf, total);
    store_fence();
    Py_END_ALLOW_THREADS out_spans_release(&spans);
    PyBuffer_Release(&data);
    return PyLong_FromSize_t(total);
}

#define FRAME_CREDIT 10

/* Release ``lock`` even with an error pending, which then stays the one raised. */
static int release_keeping_error(PyObject *lock) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    int rc = call_lock(lock, "release");
    if (type != NULL) PyErr_Restore(type, value, traceback);
    return rc;
}

/* Return ``owed`` bytes of credit on ``fd`` as a CREDIT frame, as the stream's own
 * send_control would, when that needs no waiting: 1 when the frame went out (whole, or
 * its tail left at the front of the stream's outbox for the next flush), 0 when Python
 * must send it (another thread is writing, frames are already queued, the socket is full
 * or failed; nothing was written then), -1 on a Python error. ``stream`` is the
 * TcpStream that owns ``fd``: its ``_send_lock`` is held while writing, as every writer of
 * the socket holds it, and ``bytes_sent`` counts the bytes. A round trip to Python per
 * credit was half of the receiver's calls of Python per GB. */
static int lane_send_credit(PyObject *stream, int fd, size_t owed) {
    if (owed > UINT32_MAX) return 0;
    PyObject *send_lock = PyObject_GetAttrString(stream, "_send_lock");
    if (send_lock == NULL) return -1;
    PyObject *got = PyObject_CallMethod(send_lock, "acquire", "i", 0);
    int rc = -1;
    if (got == NULL) goto done;
    int held = PyObject_IsTrue(got);
    Py_DECREF(got);
    if (held <= 0) {
        rc = held < 0 ? -1 : 0;
        goto done;
    }
    PyObject *outbox = PyObject_GetAttrString(stream, "_outbox");
    Py_ssize_t queued = outbox == NULL ? -1 : PyObject_Length(outbox);
    ssize_t sent = -1;
    unsigned char frame[FRAME_HEADER] = {0};
    if (queued == 0) { /* frames queued first go first: Python sends them, and this one after */
        frame[0] = FRAME_MAGIC & 0xFF;
        frame[1] = FRAME_MAGIC >> 8;
        frame[2] = FRAME_CREDIT;
        put_le32(frame + 12, (uint32_t)owed); /* start */
        struct iovec body = {frame, 28};
        put_le32(frame + 28, crc_iov(0, &body, 1));
        Py_BEGIN_ALLOW_THREADS sent = send(fd, frame, FRAME_HEADER, MSG_DONTWAIT | MSG_NOSIGNAL);
        Py_END_ALLOW_THREADS
    }
    rc = queued < 0 ? -1 : 0;
    if (sent > 0) {
        rc = add_to(stream, "bytes_sent", sent, 0) < 0 ? -1 : 1;
        if (rc == 1 && sent < FRAME_HEADER) { /* a frame's head: its tail goes first next time */
            PyObject *outbox_lock = PyObject_GetAttrString(stream, "_outbox_lock");
            PyObject *r = NULL;
            if (outbox_lock != NULL && call_lock(outbox_lock, "acquire") == 0) {
                r = PyObject_CallMethod(outbox, "appendleft", "y#", (const char *)frame + sent,
                                        (Py_ssize_t)(FRAME_HEADER - sent));
                if (r == NULL || add_to(stream, "_outbox_bytes", FRAME_HEADER - sent, 0) < 0) rc = -1;
                if (release_keeping_error(outbox_lock) < 0) rc = -1;
            } else
                rc = -1;
            Py_XDECREF(r);
            Py_XDECREF(outbox_lock);
        }
    }
    if (release_keeping_error(send_lock) < 0) rc = -1;
    /* As every writer of the stream does after its send: frames another thread queued
     * meanwhile (its flush found the lock held), or this frame's tail, go out now. */
    Py_ssize_t left = rc == 1 ? PyObject_Length(outbox) : 0;
    if (left < 0) rc = -1;
    if (left > 0) {
        PyObject *r = PyObject_CallMethod(stream, "flush_control", NULL);
        if (r == NULL) rc = -1;
        Py_XDECREF(r);
    }
    Py_XDECREF(outbox);
done:
    Py_DECREF(send_lock);
    return rc;
}

/* One count of the credit a connection owes: ``conn.owed``, under ``conn.owed_lock``, where
 * the receiver's other threads add what they release. The lane adds what it owes there
 * before it waits for the next frame and takes the whole out once it reaches ``batch``
 * (``*owed`` is then the total to return, else 0). Two counts, each kept short of a batch,
 * could together hold back more than the window leaves the sender beyond one chunk, and
 * the lane would wait for a frame the sender has no credit to send. -1 on a Python error. */
static int pool_owed(PyObject *conn, size_t *owed, Py_ssize_t batch) {
    PyObject *lock = PyObject_GetAttrString(conn, "owed_lock");
    if (lock == NULL) return -1;
    int rc = -1;
    if (call_lock(lock, "acquire") < 0) goto done;
    PyObject *value = PyObject_GetAttrString(conn, "owed");
    size_t before = value == NULL ? (size_t)-1 : PyLong_AsSize_t(value);
    Py_XDECREF(value);
    if (!(before == (size_t)-1 && PyErr_Occurred())) {
        size_t total = before + *owed, keep = total >= (size_t)batch ? 0 : total;
        PyObject *left = PyLong_FromSize_t(keep);
        if (left != NULL && PyObject_SetAttrString(conn, "owed", left) == 0) {
            *owed = total - keep;
            rc = 0;
        }
        Py_XDECREF(left);
    }
    if (release_keeping_error(lock) < 0) rc = -1;
done:
    Py_DECREF(lock);
    return rc;
}

/* A Python error with the rows of the frame in ``head`` claimed: LANE_FAILED, the error
 * handed to Python with the lane, so that the claim is undone before it is raised (left
 * standing, the request would wait for those rows for good). */
static PyObject *lane_failed(PyObject *lane, size_t received, size_t owed) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value == NULL) { /* cannot happen: every caller comes with an error set */
        Py_XDECREF(type);
        Py_XDECREF(traceback);
        PyErr_SetString(PyExc_SystemError, "lane_recv: a failure without an error");
        return NULL;
    }
    if (traceback != NULL) PyException_SetTraceback(value, traceback);
    PyObject *result = Py_BuildValue("iOnnO", LANE_FAILED, lane, (Py_ssize_t)received, (Py_ssize_t)owed, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return result;
}

/* ``conn.lane_claim``: the lane whose claimed rows this connection is receiving into, or
 * None (the receiver's reaper closes a connection whose receive holds up a request that
 * ended). Any error pending stays the one raised; one here is dropped, as the mark is only
 * a hint. */
static void mark_claim(PyObject *conn, PyObject *lane) {
    if (conn == Py_None) return;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (PyObject_SetAttrString(conn, "lane_claim", lane) < 0) PyErr_Clear();
    PyErr_Restore(type, value, traceback);
}

static PyObject *lane_result(int status, PyObject *lane, size_t received, size_t owed, int error) {
    return Py_BuildValue("iOnni", status, lane ? lane : Py_None, (Py_ssize_t)received, (Py_ssize_t)owed, error);
}

static PyObject *py_lane_recv(PyObject *self, PyObject *args) {
    int fd, checked;
    PyObject *head_obj, *lanes, *lock, *counters, *stream = Py_None, *conn = Py_None, *bounce_obj = Py_None;
    Py_ssize_t batch, max_payload;
    if (!PyArg_ParseTuple(args, "iOO!OnnpO|OOO", &fd, &head_obj, &PyDict_Type, &lanes, &lock, &batch, &max_payload,
                          &checked, &counters, &stream, &conn, &bounce_obj))
        return NULL;
    Py_buffer head, bounce = {0};
    if (PyObject_GetBuffer(head_obj, &head, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return NULL;
    if (bounce_obj != Py_None && PyObject_GetBuffer(bounce_obj, &bounce, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&head);
        return NULL;
    }
    PyObject *result = NULL, *lane = NULL;
    struct iovec *iov = NULL, *piece = NULL;
    size_t iov_cap = 0, received = 0, owed = 0;
    if (head.len != FRAME_HEADER) {
        PyErr_SetString(PyExc_ValueError, "lane_recv: head must be a writable 32-byte buffer");
        goto out;
    }
    for (;;) {
        if (owed > 0 && conn != Py_None && pool_owed(conn, &owed, batch) < 0) goto out;
        if (owed > 0 && owed >= (size_t)batch) { /* batch may be 0: a credit per frame */
            int sent = stream == Py_None ? 0 : lane_send_credit(stream, fd, owed);
            if (sent < 0 || (sent > 0 && add_to(counters, "lane_credits", 1, 1) < 0)) goto out;
            if (!sent) {
                result = lane_result(LANE_CREDIT, NULL, received, owed, 0);
                goto out;
            }
            owed = 0;
        }
        struct iovec one = {head.buf, FRAME_HEADER};
        size_t moved = 0;
        int err;
        Py_BEGIN_ALLOW_THREADS err = move_all(fd, &one, 1, 0, -1, &moved, 0);
        Py_END_ALLOW_THREADS received += moved;
        if (err || moved < FRAME_HEADER) {
            result = lane_result(LANE_LOST, NULL, received, owed, err);
            goto out;
        }
        DataHeader d;
        if (!data_header(head.buf, max_payload, &d)) {
            result = lane_result(LANE_PYTHON, NULL, received, owed, 0);
            goto out;
        }
        Py_buffer table;
        size_t spans = 0;
        if (call_lock(lock, "acquire") < 0) goto out;
        int claimed = lane_claim(lanes, &d, &lane, &table, &iov, &iov_cap, &spans);
        int counted = 0; /* one error at a time: no Python call while one is pending */
        if (claimed > 0 && (add_to(counters, "frames", 1, 1) < 0 || add_to(counters, "lane_frames", 1, 1) < 0 ||
                            add_to(counters, "wire_bytes", d.length, 1) < 0))
            counted = -1;
        int released = release_keeping_error(lock); /* an error of the claim or the count stays the one raised */
        if (claimed > 0 && (released < 0 || counted < 0)) {
            PyBuffer_Release(&table);
            result = lane_failed(lane, received, owed);
            goto out;
        }
        if (released < 0 || claimed < 0) goto out;
        if (!claimed) {
            result = lane_result(LANE_PYTHON, NULL, received, owed, 0);
            goto out;
        }
        mark_claim(conn, lane);
        int64_t *t = (int64_t *)table.buf;
        struct iovec *work = iov + iov_cap; /* move_all advances its copy */
        uint32_t crc = 0;
        int piecewise = checked && d.length <= SHORT_SPAN * (size_t)spans && bounce.len == 0;
        if (piecewise && piece == NULL && (piece = PyMem_RawMalloc(2 * MAX_IOV * sizeof(struct iovec))) == NULL) {
            PyBuffer_Release(&table);
            PyErr_NoMemory();
            result = lane_failed(lane, received, owed);
            goto out;
        }
        Py_BEGIN_ALLOW_THREADS if (bounce.len > 0) err =
            recv_bounced(fd, iov, spans, bounce.buf, (size_t)bounce.len, checked, &moved, &crc);
        else if (piecewise) err = recv_checked(fd, iov, spans, piece, &moved, &crc);
        else {
            memcpy(work, iov, spans * sizeof(struct iovec));
            err = move_all(fd, work, spans, 0, -1, &moved, 0);
            if (!err && moved == d.length && checked) crc = crc_iov(0, iov, spans);
        }
        Py_END_ALLOW_THREADS received += moved;
        if (err || moved < d.length) {
            PyBuffer_Release(&table);
            result = lane_result(LANE_LOST, lane, received, owed, err);
            goto out;
        }
        owed += d.length;
        if (checked && crc != d.crc) {
            PyBuffer_Release(&table);
            result = lane_result(LANE_CHECKSUM, lane, received, owed, 0);
            goto out;
        }
        if (call_lock(lock, "acquire") < 0) {
            PyBuffer_Release(&table);
            result = lane_failed(lane, received, owed);
            goto out;
        }
        int64_t *writing = (int64_t *)(uintptr_t)t[L_WRITING], *missing = (int64_t *)(uintptr_t)t[L_MISSING];
        int handoff = !t[L_LIVE] || (missing[d.layer] == 0 && writing[d.layer] == 1);
        int rc = count_chunk(lane, d.length);
        int done = !handoff && rc == 0; /* the write is finished here: nothing left to undo */
        if (done) writing[d.layer] -= 1;
        PyBuffer_Release(&table);
        mark_claim(conn, Py_None); /* received: the rows take no more bytes from this stream */
        released = release_keeping_error(lock);
        if (rc < 0 || (released < 0 && !done)) {
            result = lane_failed(lane, received, owed);
            goto out;
        }
        if (released < 0) goto out;
        if (handoff) {
            result = lane_result(LANE_HANDOFF, lane, received, owed, 0);
            goto out;
        }
        Py_CLEAR(lane);
    }
out:
    if (lane != NULL) mark_claim(conn, Py_None);
    Py_XDECREF(lane);
    PyMem_RawFree(iov);
    PyMem_RawFree(piece);
    PyBuffer_Release(&head);
    if (bounce.obj != NULL) PyBuffer_Release(&bounce);
    return result;
}

/* The hot loops are written with the compiler's vector types (8 lanes of fp32) and built
 * twice on x86-64 with GCC and glibc, for AVX2 and for the baseline, the one to run
 * chosen once at load (``target_clones``, which needs glibc's ifunc); elsewhere the vector
 * types are lowered to what the target's baseline has.
 * Rows whose length is not a multiple of 8 (R < 8) take the scalar loops. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) && defined(__ELF__)
#define SIMD_CLONES __attribute__((target_clones("avx2", "default"))) /* needs ifunc: glibc on ELF */
#else
#define SIMD_CLONES
#endif
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define ROUNDER 12582912.0f /* 1.5 * 2^23: adding and taking it away rounds |v| <= 2^22 to nearest even */

#pragma GCC diagnostic ignored "-Wpsabi" /* the vector helpers are always inlined: no call passes a vector */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

#if defined(__clang__)
#define SHUFFLE8(v, a, b, c, d, e, f, g, h) __builtin_shufflevector(v, v, a, b, c, d, e, f, g, h)
#else
#define SHUFFLE8(v, a, b, c, d, e, f, g, h) __builtin_shuffle(v, (v8i){a, b, c, d, e, f, g, h})
#endif

ALWAYS_INLINE v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}
ALWAYS_INLINE void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }
ALWAYS_INLINE v8u bf16_bits8(const uint16_t *p) { /* 8 bf16 as the bits of 8 fp32 */
    uint16_t h[8];
    memcpy(h, p, sizeof h);
    v8u bits = {h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]};
    return bits << 16;
}
ALWAYS_INLINE v8f select8(v8i mask, v8f a, v8f b) { return (v8f)((mask & (v8i)a) | (~mask & (v8i)b)); }
ALWAYS_INLINE v8f max8(v8f a, v8f b) { return select8(a > b, a, b); }
ALWAYS_INLINE v8f min8(v8f a, v8f b) { return select8(a < b, a, b); }
ALWAYS_INLINE float hmax8(v8f v) {
    float m = v[0];
    for (int k = 1; k < 8; k++) m = v[k] > m ? v[k] : m;
    return m;
}
ALWAYS_INLINE float hmin8(v8f v) {
    float m = v[0];
    for (int k = 1; k < 8; k++) m = v[k] < m ? v[k] : m;
    return m;
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* fp32 to bf16 bits, nearest, ties to even; every NaN as 0x7FC0 (kvwire/codec/base.py). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* ``n`` decoded values to a cache's dtype: fp32 (kind 0) or bf16 bits (kind 1), every NaN
 * written as that dtype's one (kvwire/codec/base.py, CANONICAL_NAN). */
static void store_values(const float *y, size_t n, void *to, int kind) {
    if (kind == 1) {
        for (size_t j = 0; j < n; j++) ((uint16_t *)to)[j] = float_to_bf16(y[j]);
        return;
    }
    const uint32_t nan_bits = 0x7FC00000u;
    float canonical_nan;
    memcpy(&canonical_nan, &nan_bits, 4);
    for (size_t j = 0; j < n; j++) ((float *)to)[j] = y[j] == y[j] ? y[j] : canonical_nan;
}

/* Element k of rows of fp32 (kind 0) or bf16 bits (kind 1), as fp32. */
ALWAYS_INLINE float widen(const void *x, int kind, Py_ssize_t k) {
    return kind ? bf16_to_float(((const uint16_t *)x)[k]) : ((const float *)x)[k];
}

/* Buffers objs[0 .. count) C-contiguous, those from ``writable_from`` on writable. */
static int get_buffers(PyObject **objs, Py_buffer *held, int count, int writable_from) {
    for (int n = 0; n < count; n++)
        if (PyObject_GetBuffer(objs[n], &held[n], PyBUF_C_CONTIGUOUS | (n >= writable_from ? PyBUF_WRITABLE : 0)) < 0) {
            while (n-- > 0) PyBuffer_Release(&held[n]);
            return -1;
        }
    return 0;
}

static void release_buffers(Py_buffer *held, int count) {
    for (int n = count; n-- > 0;) PyBuffer_Release(&held[n]);
}

/* A uint64 as an 8 x 8 bit matrix (byte i, bit j), transposed: 8 codes of 8 bits in,
 * their 8 bit planes out, and back. */
static inline uint64_t transpose8(uint64_t x) {
    uint64_t t;
    t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull;
    x ^= t ^ (t << 7);
    t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull;
    x ^= t ^ (t << 14);
    t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull;
    x ^= t ^ (t << 28);
    return x;
}

#if HAVE_X86
#include <emmintrin.h>

/* The words of 16 channels of a key group (SSE2, x86-64's baseline): ``codes`` [16][C]
 * bytes from channel ``c`` on, transposed 16 x 16 (four rounds of byte interleaving give
 * each channel's 16 tokens in one vector), then word j of a channel = the top bits of its
 * bytes once bit j is shifted up to bit 7 (token t in bit t). Returns where the words end. */
static uint16_t *channel_words16(const uint8_t *codes, Py_ssize_t C, const uint8_t *bits, uint16_t *w) {
    __m128i v[16], u[16];
    for (int t = 0; t < 16; t++) v[t] = _mm_loadu_si128((const __m128i *)(codes + t * C));
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 8; i++) {
            u[2 * i] = _mm_unpacklo_epi8(v[i], v[i + 8]);
            u[2 * i + 1] = _mm_unpackhi_epi8(v[i], v[i + 8]);
        }
        memcpy(v, u, sizeof v);
    }
    for (int c = 0; c < 16; c++)
        for (int j = 0; j < bits[c]; j++)
            *w++ = (uint16_t)_mm_movemask_epi8(_mm_sll_epi16(v[c], _mm_cvtsi32_si128(7 - j)));
    return w;
}

/* channel_words16 undone: 16 channels' words -> their codes in ``codes`` [16][C] from
 * channel ``c`` on. Word j's low byte spread over tokens 0-7, its high byte over 8-15,
 * each byte's own bit tested; then the same 16 x 16 transpose (its own inverse). */
static const uint16_t *channel_codes16(const uint16_t *w, const uint8_t *bits, uint8_t *codes, Py_ssize_t C) {
    __m128i v[16], u[16];
    const __m128i select = _mm_set1_epi64x((long long)0x8040201008040201ull);
    for (int c = 0; c < 16; c++) {
        __m128i acc = _mm_setzero_si128();
        for (int j = 0; j < bits[c]; j++, w++) {
            uint64_t lo = (uint64_t)(*w & 0xFF) * 0x0101010101010101ull, hi = (uint64_t)(*w >> 8) * 0x0101010101010101ull;
            __m128i set = _mm_cmpeq_epi8(_mm_and_si128(_mm_set_epi64x((long long)hi, (long long)lo), select), select);
            acc = _mm_or_si128(acc, _mm_and_si128(set, _mm_set1_epi8((char)(1 << j))));
        }
        v[c] = acc;
    }
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 8; i++) {
            u[2 * i] = _mm_unpacklo_epi8(v[i], v[i + 8]);
            u[2 * i + 1] = _mm_unpackhi_epi8(v[i], v[i + 8]);
        }
        memcpy(v, u, sizeof v);
    }
    for (int t = 0; t < 16; t++) _mm_storeu_si128((__m128i *)(codes + t * C), v[t]);
    return w;
}
#endif

/* The element-wise loops of key_coded (below), cloned for AVX2 like the others and
 * written as scalar loops: GCC vectorizes them with packs from fp32 to bytes, which its
 * vector types' conversions do lane by lane.
 * group_codes8: the codes of rows t0 .. t0 + here of ``x`` (fp32, kind 0, or bf16 bits,
 * kind 1) [R, C] into ``codes`` [here, C]: clamped first, then rounded, so every input has
 * one code (NaN and below 0 give 0, above top gives top), and a value in [0, 255] rounds
 * to nearest even by adding and taking away 1.5 * 2^23, with no call into libm. */
ALWAYS_INLINE uint8_t group_code(float v, float lo, float inv, float top) {
    float q = (v - lo) * inv;
    q = q > 0.0f ? q : 0.0f;
    q = q < top ? q : top;
    return (uint8_t)(int)((q + ROUNDER) - ROUNDER);
}

SIMD_CLONES
static void group_codes8(const void *x, int kind, Py_ssize_t t0, Py_ssize_t here, Py_ssize_t C, const float *lo,
                         const float *inv, const float *top, uint8_t *codes) {
    for (Py_ssize_t t = 0; t < here; t++) {
        uint8_t *out = codes + t * C;
        if (kind) {
            const uint16_t *row = (const uint16_t *)x + (t0 + t) * C;
            for (Py_ssize_t c = 0; c < C; c++) out[c] = group_code(bf16_to_float(row[c]), lo[c], inv[c], top[c]);
        } else {
            const float *row = (const float *)x + (t0 + t) * C;
            for (Py_ssize_t c = 0; c < C; c++) out[c] = group_code(row[c], lo[c], inv[c], top[c]);
        }
    }
}

/* group_values8: codes [here, C] back to values, y = code * scale + lo (two roundings). */
SIMD_CLONES
static void group_values8(const uint8_t *codes, Py_ssize_t here, Py_ssize_t C, const float *scale, const float *lo,
                          float *y) {
    for (Py_ssize_t t = 0; t < here; t++)
        for (Py_ssize_t c = 0; c < C; c++) {
            float v = (float)codes[t * C + c] * scale[c];
            y[t * C + c] = v + lo[c];
        }
}

/* key_encode(x, glo, inv, bits, out, kind=0) and key_decode(words, bits, scale, glo, out,
 * kind=0, spans=None): the coded groups of an int4a key window in one pass each
 * (docs/formats.md, "int4a"): for each group and channel in order, bits[c] 16-bit words,
 * word j holding bit j of the channel's 16 codes, token t in bit t (two 8 x 8 bit-matrix
 * transposes). ``x`` (encode) and ``out`` (decode) fp32 [R, C], the window's rows after
 * its first group;
 * ``glo``, ``inv`` (encode), ``scale`` (decode) fp32 [G, C] with G = ceil(R / 16);
 * ``bits`` uint8 [C]; ``words`` uint16 [G, sum(bits)]. The optional ``kind`` 1 reads
 * ``x`` (encode) or writes ``out`` (decode) as bf16 bits (uint16 [R, C]); decoding
 * writes NaN as the dtype's one NaN. key_decode's optional ``spans`` (an iov array taking
 * exactly the rows) makes ``out`` a work buffer of at least a row, filled and copied out to
 * the spans as fp8_dequantize's.
 *   encode: code = min(max(rint((x - glo) * inv), 0), 2^bits - 1), NaN -> 0
 *   decode: x' = code * scale + glo
 * each operation one fp32 rounding (built with -ffp-contract=off: no fused multiply-add). */
static PyObject *key_coded(PyObject *args, int encoding) {
    PyObject *a_obj, *bits_obj, *p_obj, *q_obj, *out_obj, *spans_obj = Py_None;
    int kind = 0; /* rows as fp32 (0) or bf16 bits (1) */
    if (!PyArg_ParseTuple(args, encoding ? "OOOOO|i" : "OOOOO|iO", &a_obj, encoding ? &p_obj : &bits_obj,
                          encoding ? &q_obj : &p_obj, encoding ? &bits_obj : &q_obj, &out_obj, &kind, &spans_obj))
        return NULL;
    if (kind != 0 && kind != 1) {
        PyErr_Format(PyExc_ValueError, "key coded groups: kind must be 0 (fp32) or 1 (bf16), got %d", kind);
        return NULL;
    }
    Py_buffer a, bits, p, q, out;
    Py_buffer *held[5] = {&a, &bits, &p, &q, &out};
    PyObject *objs[5] = {a_obj, bits_obj, p_obj, q_obj, out_obj};
    OutSpans spans;
    int n = 0;
    PyObject *result = NULL;
    uint8_t *codes = NULL;
    if (out_spans_get(spans_obj, &spans) < 0) return NULL;
    for (; n < 5; n++)
        if (PyObject_GetBuffer(objs[n], held[n], PyBUF_C_CONTIGUOUS | (n == 4 ? PyBUF_WRITABLE : 0)) < 0) goto done;
    Py_ssize_t C = bits.len, total = 0;
    const int spilled = spans.given, direct = encoding || (kind == 0 && !spilled); /* no fp32 work rows */
    /* 16 C codes, C floats (2^bits - 1), a group's values as fp32 to decode other than
     * straight into fp32 rows (16 C floats), then a copy of the bits: ``out`` is sized from
     * them, so the loops must read the bits checked here, not the caller's buffer again */
    if (C > PY_SSIZE_T_MAX / 128) {
        PyErr_NoMemory();
        goto done;
    }
    const size_t floats = (size_t)C * (direct ? 1 : 17);
    if ((codes = PyMem_Malloc((size_t)(16 * C) + sizeof(float) * floats + (size_t)C + 1)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    float *top = (float *)(codes + 16 * C); /* 16 C bytes keep it aligned */
    float *values = top + C;                /* when not direct */
    uint8_t *b = (uint8_t *)(top + floats);
    if (C) memcpy(b, bits.buf, (size_t)C);
    for (Py_ssize_t c = 0; c < C; c++) {
        if (b[c] < 1 || b[c] > 8) {
            PyErr_Format(PyExc_ValueError, "key coded groups: channel %zd has %d bits (1..8)", c, (int)b[c]);
            goto done;
        }
        total += b[c];
    }
    const Py_ssize_t item = kind ? 2 : 4, words_len = encoding ? out.len : a.len;
    const Py_ssize_t rows_len = encoding ? a.len : spilled ? (Py_ssize_t)spans.total : out.len;
    const Py_ssize_t R = C ? rows_len / (item * C) : 0, G = (R + 15) / 16;
    if (C == 0 || rows_len != R * item * C || p.len != G * 4 * C || q.len != G * 4 * C ||
        words_len != G * total * 2 || (spilled && out.len < C * item)) {
        PyErr_SetString(PyExc_ValueError, "key coded groups: rows fp32 or bf16 [R, C], parameters fp32 [ceil(R/16), "
                        "C], words uint16 [G, sum(bits)] (with spans: the spans taking [R, C], out at least a row)");
        goto done;
    }
    SpanCursor at = {spans.iov, 0, 0};
    const size_t room = (size_t)(out.len / item); /* with spans: values the work buffer holds */
    for (Py_ssize_t c = 0; c < C; c++) top[c] = (float)((1 << b[c]) - 1);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t g = 0; g < G; g++) {
        Py_ssize_t t0 = g * 16, here = R - t0 < 16 ? R - t0 : 16;
        const float *pa = (const float *)p.buf + g * C, *pb = (const float *)q.buf + g * C;
        if (encoding) {
            uint16_t *w = (uint16_t *)out.buf + g * total;
            memset(codes, 0, (size_t)(16 * C));
            group_codes8(a.buf, kind, t0, here, C, pa, pb, top, codes);
            Py_ssize_t c = 0;
#if HAVE_X86
            for (; c + 16 <= C; c += 16) w = channel_words16(codes + c, C, b + c, w);
#endif
            for (; c < C; c++) {
                uint64_t lo = 0, hi = 0;
                for (int t = 0; t < 8; t++) {
                    lo |= (uint64_t)codes[t * C + c] << (8 * t);
                    hi |= (uint64_t)codes[(t + 8) * C + c] << (8 * t);
                }
                lo = transpose8(lo);
                hi = transpose8(hi);
                for (int j = 0; j < b[c]; j++) *w++ = (uint16_t)(((lo >> (8 * j)) & 0xFF) | (((hi >> (8 * j)) & 0xFF) << 8));
            }
        } else {
            const uint16_t *w = (const uint16_t *)a.buf + g * total;
            float *y = direct ? (float *)out.buf + t0 * C : values;
            Py_ssize_t c = 0;
#if HAVE_X86
            for (; c + 16 <= C; c += 16) w = channel_codes16(w, b + c, codes + c, C);
#endif
            for (; c < C; c++) {
                uint64_t lo = 0, hi = 0;
                for (int j = 0; j < b[c]; j++, w++) {
                    lo |= (uint64_t)(*w & 0xFF) << (8 * j);
                    hi |= (uint64_t)(*w >> 8) << (8 * j);
                }
                lo = transpose8(lo);
                hi = transpose8(hi);
                for (int t = 0; t < 8; t++) {
                    codes[t * C + c] = (uint8_t)(lo >> (8 * t));
                    codes[(t + 8) * C + c] = (uint8_t)(hi >> (8 * t));
                }
            }
            group_values8(codes, here, C, pa, pb, y);
            const size_t count = (size_t)(here * C);
            if (direct) {
                store_values(y, count, y, 0); /* NaN made canonical in place */
            } else if (!spilled) {
                store_values(y, count, (char *)out.buf + t0 * C * item, kind);
            } else { /* a work buffer's worth at a time */
                for (size_t done = 0, piece; done < count; done += piece) {
                    piece = count - done < room ? count - done : room;
                    store_values(y + done, piece, out.buf, kind);
                    spill(&at, out.buf, piece * (size_t)item);
                }
            }
        }
    }
    if (spilled) store_fence();
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(codes);
    while (n-- > 0) PyBuffer_Release(held[n]);
    out_spans_release(&spans);
    return result;
}

/* bit_planes(codes, n, bits, planes, encoding): codes uint8 [M, n] <-> planes uint8
 * [M, bits, n / 8], plane j holding bit j of each code, code i of a byte's eight in bit i
 * (numpy's packbits with bitorder "little"; int4a's bound codes). Encoding reads the
 * codes and writes the planes (bits above ``bits`` are dropped); decoding the reverse. */
static PyObject *py_bit_planes(PyObject *self, PyObject *args) {
    PyObject *codes_obj, *planes_obj;
    Py_ssize_t n;
    int bits, encoding;
    if (!PyArg_ParseTuple(args, "OniOp", &codes_obj, &n, &bits, &planes_obj, &encoding)) return NULL;
    Py_buffer codes, planes;
    if (PyObject_GetBuffer(codes_obj, &codes, PyBUF_C_CONTIGUOUS | (encoding ? 0 : PyBUF_WRITABLE)) < 0) return NULL;
    if (PyObject_GetBuffer(planes_obj, &planes, PyBUF_C_CONTIGUOUS | (encoding ? PyBUF_WRITABLE : 0)) < 0) {
        PyBuffer_Release(&codes);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t m = n > 0 ? codes.len / n : 0;
    if (n <= 0 || n % 8 || bits < 1 || bits > 8 || codes.len != m * n || planes.len != m * bits * (n / 8)) {
        PyErr_Format(PyExc_ValueError, "bit_planes: codes uint8 [M, n], planes [M, bits, n / 8] with n a multiple of 8 "
                     "and 1 <= bits <= 8, got n %zd, bits %d, %zd and %zd bytes", n, bits, codes.len, planes.len);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t per = n / 8;
    for (Py_ssize_t r = 0; r < m; r++) {
        uint8_t *c = (uint8_t *)codes.buf + r * n, *p = (uint8_t *)planes.buf + r * bits * per;
        for (Py_ssize_t k = 0; k < per; k++) {
            uint64_t x = 0;
            if (encoding) {
                memcpy(&x, c + 8 * k, 8);
                x = transpose8(x);
                for (int j = 0; j < bits; j++) p[j * per + k] = (uint8_t)(x >> (8 * j));
            } else {
                for (int j = 0; j < bits; j++) x |= (uint64_t)p[j * per + k] << (8 * j);
                x = transpose8(x);
                memcpy(c + 8 * k, &x, 8);
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&planes);
    PyBuffer_Release(&codes);
    return result;
}

/* The loop of key_extremes (below); ``all`` holds 4 C floats. */
SIMD_CLONES
static void extremes(const void *x, int kind, Py_ssize_t R, Py_ssize_t C, Py_ssize_t rows, float *all, float *gl,
                     float *gh, float *ml,
                     float *mh) {
    float *lo_all = all, *hi_all = all + C, *lo = all + 2 * C, *hi = all + 3 * C;
    for (Py_ssize_t c = 0; c < C; c++) {
        lo_all[c] = INFINITY;
        hi_all[c] = -INFINITY;
    }
    for (Py_ssize_t g = 0; g * rows < R; g++) {
        for (Py_ssize_t c = 0; c < C; c++) {
            lo[c] = INFINITY;
            hi[c] = -INFINITY;
        }
        Py_ssize_t end = (g + 1) * rows < R ? (g + 1) * rows : R;
        for (Py_ssize_t t = g * rows; t < end; t++) {
            Py_ssize_t c = 0;
            for (; C % 8 == 0 && c < C; c += 8) {
                v8u bits;
                if (kind) {
                    bits = bf16_bits8((const uint16_t *)x + t * C + c);
                } else {
                    memcpy(&bits, (const float *)x + t * C + c, sizeof bits);
                }
                v8i finite = (v8i)((bits & 0x7F800000u) != 0x7F800000u);
                v8f v = (v8f)bits, l = load8(lo + c), h = load8(hi + c);
                store8(lo + c, select8(finite & (v < l), v, l));
                store8(hi + c, select8(finite & (v > h), v, h));
            }
            for (; c < C; c++) {
                float v = widen(x, kind, t * C + c);
                int finite = v > -INFINITY && v < INFINITY; /* NaN compares false both ways */
                lo[c] = finite && v < lo[c] ? v : lo[c];
                hi[c] = finite && v > hi[c] ? v : hi[c];
            }
        }
        for (Py_ssize_t c = 0; c < C; c++) {
            lo_all[c] = lo[c] < lo_all[c] ? lo[c] : lo_all[c];
            hi_all[c] = hi[c] > hi_all[c] ? hi[c] : hi_all[c];
            int none = lo[c] > hi[c];
            gl[g * C + c] = (none ? 0.0f : lo[c]) + 0.0f;
            gh[g * C + c] = (none ? 0.0f : hi[c]) + 0.0f;
        }
    }
    for (Py_ssize_t c = 0; c < C; c++) {
        int none = lo_all[c] > hi_all[c];
        ml[c] = (none ? 0.0f : lo_all[c]) + 0.0f;
        mh[c] = (none ? 0.0f : hi_all[c]) + 0.0f;
    }
}

/* Rows R of ``x`` [R, C] (fp32, kind 0, or bf16 bits, kind 1) and its groups G of ``rows``
 * rows (the last what is left): 0, or -1 when kind, C, rows or the length do not fit (no
 * error set: the caller names its own shapes). C is bounded first, so no product of the
 * callers' checks can wrap. */
static int group_shape(const Py_buffer *x, int kind, Py_ssize_t C, Py_ssize_t rows, Py_ssize_t *R, Py_ssize_t *G) {
    if ((kind != 0 && kind != 1) || C <= 0 || C > PY_SSIZE_T_MAX / 16 || rows <= 0) return -1;
    Py_ssize_t item = kind == 1 ? 2 : 4;
    *R = x->len / (item * C);
    *G = (*R + rows - 1) / rows;
    return x->len == *R * item * C ? 0 : -1;
}

/* key_extremes(x, kind, C, gmn, gmx, mn, mx, rows=16): of rows ``x`` [R, C] (fp32, kind 0,
 * or bf16 bits, kind 1), per group of ``rows`` rows (the last what is left) and channel the
 * min and max of the finite values (gmn, gmx fp32 [ceil(R / rows), C]), and over all rows
 * (mn, mx fp32 [C]); 0 and 0 where none is finite; every result + 0.0 (no -0). The key
 * groups of int4a (16 rows) and of int4 (a block's tokens, or key_tokens). */
static PyObject *py_key_extremes(PyObject *self, PyObject *args) {
    PyObject *objs[5];
    int kind;
    Py_ssize_t C, rows = 16;
    if (!PyArg_ParseTuple(args, "OinOOOO|n", &objs[0], &kind, &C, &objs[1], &objs[2], &objs[3], &objs[4], &rows))
        return NULL;
    Py_buffer held[5];
    if (get_buffers(objs, held, 5, 1) < 0) return NULL;
    PyObject *result = NULL;
    Py_ssize_t R, G;
    if (group_shape(&held[0], kind, C, rows, &R, &G) < 0 || held[1].len != G * C * 4 || held[2].len != G * C * 4 ||
        held[3].len != C * 4 || held[4].len != C * 4) {
        PyErr_Format(PyExc_ValueError, "key_extremes: x fp32 (kind 0) or bf16 bits (kind 1) [R, C], gmn and gmx fp32 "
                     "[ceil(R / rows), C], mn and mx fp32 [C], rows > 0; got kind %d, C %zd, rows %zd", kind, C, rows);
        goto done;
    }
    float *all = PyMem_Malloc(4 * (size_t)C * sizeof(float));
    if (all == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    extremes(held[0].buf, kind, R, C, rows, all, held[1].buf, held[2].buf, held[3].buf, held[4].buf);
    Py_END_ALLOW_THREADS
    PyMem_Free(all);
    result = Py_NewRef(Py_None);
done:
    release_buffers(held, 5);
    return result;
}

/* int4a's bit allocation for one head (kvwire/codec/allocated.py, allocate_bits): the 3 D
 * largest gains w[c] GAIN[b] (fp64; b-major index b D + c), ties to the lower index, each
 * chosen step one more bit for its channel (from 1). The k-th largest value by
 * quickselect on a copy, then every gain above it and as many equal to it as are needed,
 * in index order: the same choice as a stable descending sort's first 3 D. */
static const double GAIN[7] = {
    /* 2^30 (1 / (2^b - 1)^2 - 1 / (2^(b+1) - 1)^2), rounded down, b = 1 .. 7 (allocated.py: GAIN) */
    954437176.0, 97391548.0, 17140912.0, 3654868.0, 846785.0, 203959.0, 50059.0};

static double kth_largest(double *v, Py_ssize_t n, Py_ssize_t k) { /* k in 1 .. n; reorders v */
    Py_ssize_t lo = 0, hi = n - 1, want = k - 1; /* position in descending order */
    while (lo < hi) {
        double pivot = v[lo + (hi - lo) / 2];
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                double t = v[i];
                v[i++] = v[j];
                v[j--] = t;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            return v[want];
    }
    return v[want];
}

static void allocate_head(const double *weight, Py_ssize_t D, double *gains, double *scratch, uint8_t *bits) {
    Py_ssize_t n = 7 * D, k = 3 * D;
    for (int b = 0; b < 7; b++)
        for (Py_ssize_t c = 0; c < D; c++) gains[b * D + c] = weight[c] * GAIN[b];
    memcpy(scratch, gains, (size_t)n * sizeof(double));
    double t = kth_largest(scratch, n, k);
    Py_ssize_t above = 0;
    for (Py_ssize_t i = 0; i < n; i++) above += gains[i] > t;
    Py_ssize_t equal_left = k - above;
    for (Py_ssize_t c = 0; c < D; c++) bits[c] = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        int take = gains[i] > t;
        if (!take && gains[i] == t && equal_left > 0) {
            take = 1;
            equal_left--;
        }
        bits[i % D] += (uint8_t)take;
    }
}

/* The loops of key_grid (below), cloned for AVX2 like the others: without AVX the
 * compiler splits the 8-lane comparisons into scalar ones. */
SIMD_CLONES
static void grid_loops(const float *lo, const float *hi, Py_ssize_t heads, Py_ssize_t D, Py_ssize_t G, uint8_t *bounds,
                       float *glo, float *scale, uint8_t *bits, const float *gmn, const float *gmx, double *work) {
    const Py_ssize_t C = heads * D;
    const int encoding = gmn != NULL;
    double *weight = work, *gains = work + C, *copy = gains + 7 * D;
    float *step = (float *)(copy + 7 * D), *inv_step = step + C;
    int64_t *spread = (int64_t *)weight; /* the squared code ranges' sums, before they become weights */
    for (Py_ssize_t c = 0; c < C; c++) {
        step[c] = (hi[c] - lo[c]) / 127.0f;
        inv_step[c] = step[c] > 0.0f ? 1.0f / step[c] : 0.0f;
        spread[c] = 0;
    }
    for (Py_ssize_t g = 0; g < G; g++)
        for (Py_ssize_t h = 0; h < heads; h++) {
            uint8_t *low = bounds + (g * heads + h) * 2 * D, *high = low + D;
            const float *l = lo + h * D, *iv = inv_step + h * D;
            if (encoding) { /* the bound codes: floor and ceil of (extreme - lo) / step, clamped */
                const float *mn = gmn + g * C + h * D, *mx = gmx + g * C + h * D;
                Py_ssize_t j = 0;
                for (; j + 8 <= D; j += 8) { /* the loop below, 8 channels at a time */
                    const v8f inv = load8(iv + j), base = load8(l + j), m1 = (v8f){0} - 1.0f, zero = {0};
                    v8f a = (load8(mn + j) - base) * inv, b = (load8(mx + j) - base) * inv;
                    a = min8(max8(a, m1), zero + 128.0f);
                    b = min8(max8(b, m1), zero + 128.0f);
                    v8f fa = (a + ROUNDER) - ROUNDER, cb = (b + ROUNDER) - ROUNDER;
                    fa = select8(fa > a, fa - 1.0f, fa);
                    cb = select8(cb < b, cb + 1.0f, cb);
                    fa = min8(max8(fa, zero), zero + 127.0f);
                    cb = min8(max8(cb, zero), zero + 127.0f);
                    /* an integer 0 .. 127 plus 2^23 has itself in its low mantissa bits */
                    uint32_t ia[8], ib[8];
                    v8u ua = (v8u)(fa + 8388608.0f), ub = (v8u)(cb + 8388608.0f);
                    memcpy(ia, &ua, sizeof ia);
                    memcpy(ib, &ub, sizeof ib);
                    for (int k = 0; k < 8; k++) {
                        low[j + k] = (uint8_t)ia[k];
                        high[j + k] = (uint8_t)ib[k];
                    }
                }
                for (; j < D; j++) {
                    float inv = iv[j];
                    /* clamped to [-1, 128] first (the codes are clamped to [0, 127] after), then
                     * rounded to nearest and stepped down (floor) or up (ceil): no libm call */
                    float a = (mn[j] - l[j]) * inv, b = (mx[j] - l[j]) * inv;
                    a = a > -1.0f ? (a < 128.0f ? a : 128.0f) : -1.0f;
                    b = b > -1.0f ? (b < 128.0f ? b : 128.0f) : -1.0f;
                    float fa = (a + ROUNDER) - ROUNDER, cb = (b + ROUNDER) - ROUNDER;
                    fa = fa > a ? fa - 1.0f : fa;
                    cb = cb < b ? cb + 1.0f : cb;
                    low[j] = (uint8_t)(fa > 0.0f ? (fa < 127.0f ? fa : 127.0f) : 0.0f);
                    high[j] = (uint8_t)(cb > 0.0f ? (cb < 127.0f ? cb : 127.0f) : 0.0f);
                }
            }
            int64_t *sp = spread + h * D;
            for (Py_ssize_t j = 0; j < D; j++) {
                int64_t r = (int64_t)high[j] - (int64_t)low[j];
                sp[j] += r * r;
            }
        }
    for (Py_ssize_t c = 0; c < C; c++) {
        double range = (double)(hi[c] - lo[c]);
        double value = (double)spread[c] * (range * range);
        weight[c] = value != value ? 0.0 : value; /* bytes no encoder writes: NaN counts as 0 */
    }
    for (Py_ssize_t h = 0; h < heads; h++) allocate_head(weight + h * D, D, gains, copy, bits + h * D);
    float *top = inv_step; /* 2^bits - 1 per channel (C floats): the encoding's 1 / step are used up */
    for (Py_ssize_t c = 0; c < C; c++) top[c] = (float)((1 << bits[c]) - 1);
    for (Py_ssize_t g = 0; g < G; g++)
        for (Py_ssize_t h = 0; h < heads; h++) {
            const uint8_t *low = bounds + (g * heads + h) * 2 * D, *high = low + D;
            const float *l = lo + h * D, *st = step + h * D, *tp = top + h * D;
            float *gl = glo + g * C + h * D, *sc = scale + g * C + h * D;
            Py_ssize_t j = 0;
            for (; j + 8 <= D; j += 8) { /* the loop below, 8 channels at a time */
                v8f lc, hc;
                for (int k = 0; k < 8; k++) {
                    lc[k] = (float)low[j + k];
                    hc[k] = (float)high[j + k];
                }
                const v8f sv = load8(st + j), base = load8(l + j);
                v8f a = lc * sv + base, b = hc * sv + base, q = (b - a) / load8(tp + j);
                store8(gl + j, a);
                store8(sc + j, encoding ? select8(q > 0.0f, 1.0f / q, (v8f){0}) : q);
            }
            for (; j < D; j++) {
                float a = (float)low[j] * st[j] + l[j], b = (float)high[j] * st[j] + l[j];
                float q = (b - a) / tp[j];
                gl[j] = a;
                sc[j] = encoding ? (q > 0.0f ? 1.0f / q : 0.0f) : q;
            }
        }
}

/* key_grid(lo, hi, heads, bounds, glo, scale, bits, gmn, gmx): an int4a key window's
 * grid (kvwire/codec/allocated.py: the bound codes, _group_grid, allocate_bits and the
 * codes' steps), the same fp32 and fp64 operations in the same order. ``lo``, ``hi``
 * fp32 [C] (the channels' fp16 range, C = heads D); ``bounds`` uint8 [G, heads, 2, D]
 * (each group's min and max codes, 0 .. 127). With ``gmn``, ``gmx`` (fp32 [G, C], the
 * groups' extremes) the bound codes are computed into ``bounds`` (encoding) and ``scale``
 * receives each group's 1 / step (0 for a step of 0); without them ``bounds`` is read
 * (decoding) and ``scale`` receives the step. ``glo`` fp32 [G, C]: each group's min;
 * ``bits`` uint8 [C]. */
static PyObject *py_key_grid(PyObject *self, PyObject *args) {
    PyObject *objs[8] = {NULL};
    Py_ssize_t heads;
    if (!PyArg_ParseTuple(args, "OOnOOOO|OO", &objs[0], &objs[1], &heads, &objs[2], &objs[3], &objs[4], &objs[5],
                          &objs[6], &objs[7]))
        return NULL;
    if ((objs[6] == NULL) != (objs[7] == NULL)) {
        PyErr_SetString(PyExc_ValueError, "key_grid: gmn and gmx go together (encoding) or are both left out");
        return NULL;
    }
    int encoding = objs[6] != NULL;
    int count = encoding ? 8 : 6;
    Py_buffer held[8];
    /* bounds are written when encoding: take them writable, with glo, scale and bits */
    if (get_buffers(objs, held, 2, 2) < 0) return NULL;
    if (get_buffers(objs + 2, held + 2, 4, encoding ? 0 : 1) < 0) {
        release_buffers(held, 2);
        return NULL;
    }
    if (encoding && get_buffers(objs + 6, held + 6, 2, 2) < 0) {
        release_buffers(held, 6);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t C = held[0].len / 4, D = heads > 0 ? C / heads : 0, G = C > 0 ? held[3].len / (4 * C) : 0;
    if (heads <= 0 || C <= 0 || C > PY_SSIZE_T_MAX / 64 || D * heads != C || held[0].len != 4 * C ||
        held[1].len != 4 * C || held[2].len != 2 * G * C || held[3].len != 4 * G * C || held[4].len != 4 * G * C ||
        held[5].len != C || (encoding && (held[6].len != 4 * G * C || held[7].len != 4 * G * C))) {
        PyErr_Format(PyExc_ValueError, "key_grid: lo and hi fp32 [C], C = heads D, bounds uint8 [G, heads, 2, D], glo "
                     "and scale fp32 [G, C], bits uint8 [C], gmn and gmx fp32 [G, C]; got heads %zd, %zd bytes of lo",
                     heads, held[0].len);
        goto done;
    }
    double *work = PyMem_Malloc((size_t)C * sizeof(double) + 14 * (size_t)D * sizeof(double) + 2 * (size_t)C * sizeof(float));
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    grid_loops(held[0].buf, held[1].buf, heads, D, G, held[2].buf, held[3].buf, held[4].buf, held[5].buf,
               encoding ? held[6].buf : NULL, encoding ? held[7].buf : NULL, work);
    Py_END_ALLOW_THREADS
    PyMem_Free(work);
    result = Py_NewRef(Py_None);
done:
    release_buffers(held, count);
    return result;
}

static PyObject *py_key_encode(PyObject *self, PyObject *args) { return key_coded(args, 1); }
static PyObject *py_key_decode(PyObject *self, PyObject *args) { return key_coded(args, 0); }

/* frexpf without the call for normal numbers: f with |f| in [0.5, 1) and *ex, x = f 2^ex. */
static inline float frexp_fast(float x, int *ex) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    const uint32_t biased = (bits >> 23) & 0xFFu;
    if (biased == 0 || biased == 0xFFu) return frexpf(x, ex); /* zero, subnormal, inf, NaN */
    *ex = (int)biased - 126;
    bits = (bits & 0x807FFFFFu) | (126u << 23);
    memcpy(&x, &bits, 4);
    return x;
}

static inline float pow2f(int k) { /* 2^k for k in [-126, 127], exactly */
    uint32_t bits = (uint32_t)(k + 127) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* int4a's compact value rows (docs/formats.md, "int4a"): each row's scale is 2^(k/16) on a
 * grid kept per head as a base (int16) and a byte per row, its zero-point a 4-bit integer.
 * ROOTS_4A[j] = 2^(j/16) rounded to the nearest fp32 (allocated.py's ROOTS). */
static const float ROOTS_4A[16] = {
    0x1.000000p+0f, 0x1.0b5586p+0f, 0x1.172b84p+0f, 0x1.2387a6p+0f, 0x1.306fe0p+0f, 0x1.3dea64p+0f,
    0x1.4bfdaep+0f, 0x1.5ab07ep+0f, 0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f, 0x1.9c4918p+0f,
    0x1.ae89fap+0f, 0x1.c199bep+0f, 0x1.d5818ep+0f, 0x1.ea4afap+0f,
};
#define SCALE_LOW_4A (-118 * 16)
#define SCALE_HIGH_4A (118 * 16 + 15)
#define NO_SCALE_4A (-(INT64_C(1) << 20))

static inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

static inline int64_t floor_div16(int64_t v) { return v >= 0 ? v / 16 : -((-v + 15) / 16); }

/* ROOTS_4A[k mod 16] * 2^exponent, exact; inf above 2^127, 0 below 2^-126 (allocated.py's _row_step). */
static inline float row_step_4a(int64_t k, int64_t exponent) {
    if (exponent > 127) return INFINITY;
    if (exponent < -126) return 0.0f;
    return ROOTS_4A[k & 15] * pow2f((int)exponent);
}

/* A compact row's k: the least k with 2^(k/16) >= range / 15, in the row's real units
 * (its rotated stats: exponent e, min mn, max mx), clamped to the grid; NO_SCALE_4A for a
 * row of one value. */
static inline int64_t row_k_4a(int32_t e, float mn, float mx, int log_block) {
    float u = (mx - mn) / 15.0f;
    if (!(u > 0.0f)) return NO_SCALE_4A;
    int ex;
    float twice = frexp_fast(u, &ex) * 2.0f; /* in [1, 2): exact */
    int below = 0;
    for (int j = 0; j < 16; j++) below += twice > ROOTS_4A[j];
    return clamp64(16 * ((int64_t)ex - 1) + below + 16 * ((int64_t)e - 16 - log_block), SCALE_LOW_4A, SCALE_HIGH_4A);
}

/* A compact row's code multiplier ``*inv`` and zero-point ``*z`` (rot_quantize's mode 5)
 * when it travels with scale index ``kk``. */
static inline void row_params_4a(int64_t kk, int32_t e, float mn, int log_block, float *inv, float *z) {
    float step = row_step_4a(kk, floor_div16(kk) - e + 16 + log_block);
    float q = step > 0.0f && step < INFINITY ? 1.0f / step : 0.0f;
    float zp = rintf(-mn * q);
    zp = zp > 0.0f ? zp : 0.0f;
    *inv = q;
    *z = zp < 15.0f ? zp : 15.0f;
}

/* Each head's base: its rows' largest k less 255, on the grid (rows in [token][head] order). */
static void row_bases_4a(const int64_t *k, Py_ssize_t n, Py_ssize_t heads, int16_t *base) {
    for (Py_ssize_t h = 0; h < heads; h++) {
        int64_t top = NO_SCALE_4A; /* no k is below it */
        for (Py_ssize_t r = h; r < n; r += heads) top = k[r] > top ? k[r] : top;
        base[h] = (int16_t)clamp64(top - 255, SCALE_LOW_4A, SCALE_HIGH_4A - 255);
    }
}

/* row_steps4a(code, base, zeros, scale, z): rot_encode4a's bytes back to each row's scale
 * ``scale`` (ROOTS_4A[kk mod 16] 2^floor(kk / 16), kk = base[head] + code) and zero-point
 * ``z`` (fp32 [N]), for rot_dequantize's mode 5 (allocated.py's decode_rows). */
static PyObject *py_row_steps4a(PyObject *self, PyObject *args) {
    PyObject *objs[5];
    if (!PyArg_ParseTuple(args, "OOOOO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4])) return NULL;
    Py_buffer held[5];
    if (get_buffers(objs, held, 5, 3) < 0) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = held[0].len, heads = held[1].len / 2, later = heads > 0 ? n / heads : 0, half = (later + 1) / 2;
    if (heads <= 0 || held[1].len != heads * 2 || n % heads || held[2].len != heads * half || held[3].len != n * 4 ||
        held[4].len != n * 4) {
        PyErr_SetString(PyExc_ValueError, "row_steps4a: code uint8 [N] with N a multiple of heads, base int16 "
                        "[heads], zeros uint8 [heads, ceil(N / heads / 2)], scale and z fp32 [N]");
        goto done;
    }
    const uint8_t *code = held[0].buf, *zeros = held[2].buf, *base = held[1].buf; /* base: int16, maybe unaligned */
    float *scale = held[3].buf, *z = held[4].buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0, r = 0; t < later; t++)
        for (Py_ssize_t h = 0; h < heads; h++, r++) {
            int16_t b;
            memcpy(&b, base + 2 * h, sizeof b);
            int64_t kk = (int64_t)b + code[r];
            scale[r] = row_step_4a(kk, floor_div16(kk));
            z[r] = (float)((zeros[h * half + t / 2] >> (4 * (t % 2))) & 15);
        }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release_buffers(held, 5);
    return result;
}


/* Rotated rows (docs/formats.md, "int8h", "int4h", "int4a"; kvwire/codec/rotated.py has
 * the arithmetic and the torch path these replace, a test holds the two to the same
 * bytes). Rows of ``d`` values, read as fp32 (kind 0) or bf16 (kind 1, the bits as
 * uint16), each one:
 *   x_i = 0 where not finite; m = max |x_i| = f 2^e (0.5 <= f < 1);
 *   a zero row (m == 0 or e < -90): e = 0, every n_i = 0; else n_i = rint(x_i 2^(16 - e));
 *   y = H_R n block by block (exact integers in fp32: any order gives the same), + 0.0.
 *
 * rot_stats(x, kind, d, e, mn, mx)           -> e (int32 [N]), min and max of y (fp32 [N])
 * rot_quantize(x, kind, d, mode, inv, z, out) -> codes of y, rotating each row again:
 *   mode 8: int8 [N, d], c = clamp(rint(y inv), -127, 127)
 *   mode 4: two per byte, even channel low, c = clamp(rint((y - z) inv), 0, 15)   (int4h)
 *   mode 5: the same packing, c = clamp(rint(y inv + z), 0, 15)                    (int4a)
 * rot_dequantize(codes, mode, d, scale, zero, out, kind, spans=None) -> rows of fp32 (kind 0)
 * or bf16 (kind 1: nearest, ties to even) in ``out``, every NaN as the canonical one (given
 * ``spans``, taking exactly the rows, ``out`` is a work buffer of at least a row: rows are
 * decoded into it a piece at a time and copied to the spans, as fp8_dequantize does):
 *   mode 8: x' = (H c) S;  mode 4: x' = (H c) S, each block's first element
 *   ((v 2^-L) S + Z) 2^L;  mode 5: x' = (H (c - z)) S.
 * The per-row parameters (inv, z, scale, zero: fp32 [N]) come from the caller, computed
 * from rot_stats' results by the same torch code as the reference, so only the
 * element-wise work is here. Each float operation is one IEEE fp32 rounding (no
 * contraction: see the top of the file); integers in [-2^22, 2^22] round to nearest even
 * by adding and taking away 1.5 * 2^23 (no libm call, and it stays in vector registers). */


static int rotation_block(Py_ssize_t d) {
    Py_ssize_t r = d & -d;
    return (int)(r < 256 ? r : 256);
}

/* One block of ``8 nv`` values in ``nv`` vectors: H_R p, then + 0.0. The first three
 * stages run inside each vector (a lane and its partner), the others between vectors;
 * called with a constant ``nv``, the block stays in registers. */
ALWAYS_INLINE void hadamard_block(float *p, const int nv) {
    const v8f s1 = {1, -1, 1, -1, 1, -1, 1, -1}, s2 = {1, 1, -1, -1, 1, 1, -1, -1}, s4 = {1, 1, 1, 1, -1, -1, -1, -1};
    v8f v[32];
#pragma GCC unroll 32
    for (int k = 0; k < nv; k++) {
        v8f u = load8(p + 8 * k);
        u = SHUFFLE8(u, 1, 0, 3, 2, 5, 4, 7, 6) + u * s1;
        u = SHUFFLE8(u, 2, 3, 0, 1, 6, 7, 4, 5) + u * s2;
        v[k] = SHUFFLE8(u, 4, 5, 6, 7, 0, 1, 2, 3) + u * s4;
    }
#pragma GCC unroll 8
    for (int h = 1; h < nv; h <<= 1)
#pragma GCC unroll 16
        for (int i = 0; i < nv; i += 2 * h)
#pragma GCC unroll 16
            for (int j = i; j < i + h; j++) {
                v8f u = v[j], w = v[j + h];
                v[j] = u + w;
                v[j + h] = u - w;
            }
#pragma GCC unroll 32
    for (int k = 0; k < nv; k++) store8(p + 8 * k, v[k] + 0.0f); /* +0 for zero, whatever sign the sums gave it */
}

/* y = H_R y block by block, then + 0.0 (R >= 8 in vectors, one constant size per case). */
ALWAYS_INLINE void hadamard_rows(float *y, Py_ssize_t d, int r) {
    for (Py_ssize_t b = 0; r >= 8 && b < d; b += r) switch (r) {
        case 8: hadamard_block(y + b, 1); break;
        case 16: hadamard_block(y + b, 2); break;
        case 32: hadamard_block(y + b, 4); break;
        case 64: hadamard_block(y + b, 8); break;
        case 128: hadamard_block(y + b, 16); break;
        default: hadamard_block(y + b, 32); break;
    }
    if (r >= 8) return;
    for (Py_ssize_t b = 0; b < d; b += r) {
        float *p = y + b;
        for (int h = 1; h < r; h <<= 1)
            for (int i = 0; i < r; i += 2 * h)
                for (int j = i; j < i + h; j++) {
                    float u = p[j], w = p[j + h];
                    p[j] = u + w;
                    p[j + h] = u - w;
                }
    }
    for (Py_ssize_t i = 0; i < d; i++) y[i] += 0.0f;
}

/* Values k .. k + 8 of ``x`` into ``y``, non-finite ones as +0; returns their magnitudes. */
ALWAYS_INLINE v8f load_finite8(const void *x, int kind, Py_ssize_t k, float *y) {
    v8u bits;
    if (kind == 1) {
        bits = bf16_bits8((const uint16_t *)x + k);
    } else {
        memcpy(&bits, (const float *)x + k, sizeof bits);
    }
    bits &= (v8u)((bits & 0x7F800000u) != 0x7F800000u); /* inf and NaN -> +0 */
    store8(y, (v8f)bits);
    return (v8f)(bits & 0x7FFFFFFFu);
}

/* Row ``i`` of ``x`` into ``y``, non-finite values as 0; returns max |y|. */
ALWAYS_INLINE float load_row(const void *x, int kind, Py_ssize_t i, Py_ssize_t d, float *y) {
    if (d % 8 == 0) {
        /* four running maxima, so that no compare waits for the one before: over values
         * that are neither NaN nor -0, any order gives the same maximum */
        v8f m0 = {0}, m1 = {0}, m2 = {0}, m3 = {0};
        Py_ssize_t j = 0;
        for (; j + 32 <= d; j += 32) {
            m0 = max8(m0, load_finite8(x, kind, i * d + j, y + j));
            m1 = max8(m1, load_finite8(x, kind, i * d + j + 8, y + j + 8));
            m2 = max8(m2, load_finite8(x, kind, i * d + j + 16, y + j + 16));
            m3 = max8(m3, load_finite8(x, kind, i * d + j + 24, y + j + 24));
        }
        for (; j < d; j += 8) m0 = max8(m0, load_finite8(x, kind, i * d + j, y + j));
        return hmax8(max8(max8(m0, m1), max8(m2, m3)));
    }
    float m = 0.0f;
    for (Py_ssize_t j = 0; j < d; j++) {
        float v = kind == 1 ? bf16_to_float(((const uint16_t *)x)[i * d + j]) : ((const float *)x)[i * d + j];
        v = isfinite(v) ? v : 0.0f;
        y[j] = v;
        float a = fabsf(v);
        m = a > m ? a : m;
    }
    return m;
}

/* Row ``i`` of ``x`` fixed-point and rotated into ``y``; returns its exponent e. */
ALWAYS_INLINE int rotate_row(const void *x, int kind, Py_ssize_t i, Py_ssize_t d, float *y) {
    float m = load_row(x, kind, i, d, y);
    int e = 0;
    frexp_fast(m, &e);
    if (m == 0.0f || e < -90) {
        memset(y, 0, (size_t)d * sizeof(float));
        return 0;
    }
    const float f = pow2f(16 - e); /* 16 - e in [-112, 106]: an exact product, |n| <= 2^16 */
    for (Py_ssize_t j = 0; j < d; j++) y[j] = (y[j] * f + ROUNDER) - ROUNDER;
    hadamard_rows(y, d, rotation_block(d));
    return e;
}

/* The least and the greatest of a rotated row ``y``. */
ALWAYS_INLINE void row_range(const float *y, Py_ssize_t d, float *mn, float *mx) {
    float lo = y[0], hi = y[0];
    if (d % 8 == 0) { /* four of each, as load_row's (a rotated row holds no NaN and no -0) */
        v8f lo0 = load8(y), lo1 = lo0, lo2 = lo0, lo3 = lo0, hi0 = lo0, hi1 = lo0, hi2 = lo0, hi3 = lo0;
        Py_ssize_t j = 0;
        for (; j + 32 <= d; j += 32) {
            v8f a = load8(y + j), b = load8(y + j + 8), c = load8(y + j + 16), e = load8(y + j + 24);
            lo0 = min8(lo0, a), hi0 = max8(hi0, a);
            lo1 = min8(lo1, b), hi1 = max8(hi1, b);
            lo2 = min8(lo2, c), hi2 = max8(hi2, c);
            lo3 = min8(lo3, e), hi3 = max8(hi3, e);
        }
        for (; j < d; j += 8) {
            v8f a = load8(y + j);
            lo0 = min8(lo0, a), hi0 = max8(hi0, a);
        }
        lo = hmin8(min8(min8(lo0, lo1), min8(lo2, lo3)));
        hi = hmax8(max8(max8(hi0, hi1), max8(hi2, hi3)));
    } else {
        for (Py_ssize_t j = 1; j < d; j++) {
            lo = y[j] < lo ? y[j] : lo;
            hi = y[j] > hi ? y[j] : hi;
        }
    }
    *mn = lo;
    *mx = hi;
}

SIMD_CLONES
static void stats_rows(const void *x, int kind, Py_ssize_t n, Py_ssize_t d, float *y, int32_t *e, float *mn, float *mx) {
    for (Py_ssize_t i = 0; i < n; i++) {
        e[i] = rotate_row(x, kind, i, d, y);
        row_range(y, d, mn + i, mx + i);
    }
}

/* A rotated row ``y``'s codes into ``out`` (row ``i`` of the codes), from its ``s`` and
 * ``o`` (see quantize in kvwire/codec/rotated.py). Clamped first, then rounded: integer
 * bounds make that the same code. */
ALWAYS_INLINE void quantize_row(float *y, Py_ssize_t d, int mode, float s, float o, void *out, Py_ssize_t i) {
    const float lo = mode == 8 ? -127.0f : 0.0f, hi = mode == 8 ? 127.0f : 15.0f;
    if (d % 8 == 0) {
        for (Py_ssize_t j = 0; j < d; j += 8) {
            v8f v = load8(y + j);
            v = mode == 4 ? (v - o) * s : mode == 5 ? v * s + o : v * s;
            v = min8(max8(v, (v8f){0} + lo), (v8f){0} + hi);
            store8(y + j, (v + ROUNDER) - ROUNDER);
        }
    } else {
        for (Py_ssize_t j = 0; j < d; j++) {
            float v = mode == 4 ? (y[j] - o) * s : mode == 5 ? y[j] * s + o : y[j] * s;
            v = v > lo ? v : lo;
            v = v < hi ? v : hi;
            y[j] = (v + ROUNDER) - ROUNDER;
        }
    }
    if (mode == 8) {
        int8_t *c = (int8_t *)out + i * d;
        for (Py_ssize_t j = 0; j < d; j++) c[j] = (int8_t)y[j];
    } else {
        uint8_t *c = (uint8_t *)out + i * (d / 2);
        for (Py_ssize_t j = 0; j < d / 2; j++) c[j] = (uint8_t)((int)y[2 * j] | ((int)y[2 * j + 1] << 4));
    }
}

SIMD_CLONES
static void quantize_rows(const void *x, int kind, Py_ssize_t n, Py_ssize_t d, int mode, const float *inv,
                          const float *z, float *y, void *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        rotate_row(x, kind, i, d, y);
        quantize_row(y, d, mode, inv[i], z[i], out, i);
    }
}

/* An int4a value window's compact rows coded in one call (py_rot_encode4a). Each row is
 * rotated once and coded with its own scale index k while it is in cache. A row that the
 * head's base then clamps (its range 2^(255/16) under the head's widest, or one value
 * repeated) is rotated again and coded with the clamped index; a row of zeros has the
 * same codes either way. ``y`` d floats; ``k``, ``e``, ``mn``, ``zr`` (zero-points) N each. */
SIMD_CLONES
static void encode_rows4a(const void *x, int kind, Py_ssize_t n, Py_ssize_t heads, Py_ssize_t d, int log_block,
                          float *y, int64_t *k, int32_t *e, float *mn, uint8_t *zr, int16_t *base, uint8_t *code,
                          uint8_t *zeros, uint8_t *codes) {
    for (Py_ssize_t r = 0; r < n; r++) {
        float hi, inv = 0.0f, z = 0.0f;
        e[r] = rotate_row(x, kind, r, d, y);
        row_range(y, d, mn + r, &hi);
        k[r] = row_k_4a(e[r], mn[r], hi, log_block);
        if (k[r] != NO_SCALE_4A) row_params_4a(k[r], e[r], mn[r], log_block, &inv, &z);
        quantize_row(y, d, 5, inv, z, codes, r);
        zr[r] = (uint8_t)z;
    }
    row_bases_4a(k, n, heads, base);
    const Py_ssize_t later = n / heads, half = (later + 1) / 2;
    memset(zeros, 0, (size_t)(heads * half));
    for (Py_ssize_t t = 0, r = 0; t < later; t++)
        for (Py_ssize_t h = 0; h < heads; h++, r++) {
            const int64_t c = clamp64(k[r] - base[h], 0, 255), kk = base[h] + c;
            if (kk != k[r]) { /* clamped: its parameters from the base */
                float inv, z;
                row_params_4a(kk, e[r], mn[r], log_block, &inv, &z);
                zr[r] = (uint8_t)z;
                if (!(k[r] == NO_SCALE_4A && mn[r] == 0.0f)) {
                    rotate_row(x, kind, r, d, y);
                    quantize_row(y, d, 5, inv, z, codes, r);
                }
            }
            code[r] = (uint8_t)c;
            zeros[h * half + t / 2] |= (uint8_t)(zr[r] << (4 * (t % 2)));
        }
}

static inline float bf16_value(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Rotated rows in one pass (kvwire/codec/rotated.py, quantize8 and quantize4): each row
 * rotated once, measured, and its parameters and codes written while it is in cache,
 * where rot_stats and rot_quantize rotate it twice. ``params`` is 4 bytes a row: the
 * scale S fp32 (mode 8), or S then Z, bf16 each, in two arrays of N (mode 4). The same
 * values as there, with p = 2^(e - 16 - log2 block) (e is 0 or in [-90, 128], so every
 * power of two here is within [-114, 114]):
 *   mode 8: step = max(max y, -min y) / 127 (+0.0: never -0), S = step p, inv = 1 / step;
 *   mode 4: S = bf16((max y - min y) / 15 p), Z = bf16(min y p), step = S / p, z = Z / p,
 *           inv = 1 / step;
 * inv is 0 for a zero step. */
SIMD_CLONES
static void encode_rows(const void *x, int kind, Py_ssize_t n, Py_ssize_t d, int mode, float *y, uint8_t *params,
                        void *codes, Py_ssize_t rows) {
    const int log_block = __builtin_ctz((unsigned)rotation_block(d));
    for (Py_ssize_t i = 0; i < n; i++) {
        const int e = rotate_row(x, kind, i, d, y);
        float lo, hi;
        row_range(y, d, &lo, &hi);
        const float p = pow2f(e - 16 - log_block);
        float step, z = 0.0f;
        if (mode == 8) {
            step = ((hi > -lo ? hi : -lo) + 0.0f) / 127.0f;
            const float s = step * p;
            memcpy(params + 4 * i, &s, 4);
        } else {
            const uint16_t sb = float_to_bf16((hi - lo) / 15.0f * p), zb = float_to_bf16(lo * p);
            memcpy(params + 2 * i, &sb, 2);
            memcpy(params + 2 * (rows + i), &zb, 2);
            const float q = pow2f(16 + log_block - e);
            step = bf16_value(sb) * q;
            z = bf16_value(zb) * q;
        }
        const float inv = step > 0.0f ? 1.0f / step : 0.0f;
        quantize_row(y, d, mode, inv, z, codes, i);
    }
}

SIMD_CLONES
static void dequantize_rows(const void *codes, int mode, Py_ssize_t n, Py_ssize_t d, const float *scale,
                            const float *zero, float *y, void *out, int kind) {
    const int r = rotation_block(d);
    const float down = 1.0f / (float)r, up = (float)r;
    const uint32_t nan_bits = 0x7FC00000u; /* every NaN written as this one (kvwire/codec/base.py) */
    float canonical_nan;
    memcpy(&canonical_nan, &nan_bits, 4);
    float *first = y + d; /* int4h: each block's first element, from its own formula */
    for (Py_ssize_t i = 0; i < n; i++) {
        const float s = scale[i], o = zero[i];
        if (mode == 8) {
            const int8_t *c = (const int8_t *)codes + i * d;
            for (Py_ssize_t j = 0; j < d; j++) y[j] = (float)c[j];
        } else {
            const uint8_t *c = (const uint8_t *)codes + i * (d / 2);
            for (Py_ssize_t j = 0; j < d / 2; j++) {
                y[2 * j] = (float)(c[j] & 0x0F);
                y[2 * j + 1] = (float)(c[j] >> 4);
            }
            if (mode == 5)
                for (Py_ssize_t j = 0; j < d; j++) y[j] -= o;
        }
        hadamard_rows(y, d, r);
        for (Py_ssize_t b = 0; mode == 4 && b < d; b += r) first[b / r] = ((y[b] * down) * s + o) * up;
        for (Py_ssize_t j = 0; j < d; j++) y[j] *= s;
        for (Py_ssize_t b = 0; mode == 4 && b < d; b += r) y[b] = first[b / r];
        if (kind == 1) {
            uint16_t *to = (uint16_t *)out + i * d;
            for (Py_ssize_t j = 0; j < d; j++) to[j] = float_to_bf16(y[j]);
        } else {
            float *to = (float *)out + i * d;
            for (Py_ssize_t j = 0; j < d; j++) to[j] = y[j] == y[j] ? y[j] : canonical_nan;
        }
    }
}

/* The rows of ``x`` (kind 0 or 1, d per row), or -1 with an error set. */
static Py_ssize_t rot_rows(const Py_buffer *x, int kind, Py_ssize_t d) {
    Py_ssize_t item = kind == 1 ? 2 : 4;
    if ((kind != 0 && kind != 1) || d <= 0 || d > PY_SSIZE_T_MAX / 16 || x->len % (item * d)) {
        PyErr_Format(PyExc_ValueError, "rotated rows: x must be fp32 (kind 0) or bf16 bits (kind 1) [N, d], "
                     "got kind %d, %zd bytes, d %zd", kind, x->len, d);
        return -1;
    }
    return x->len / (item * d);
}

/* Bytes of codes per row of ``d`` values in ``mode`` (8: one each; 4 and 5: two per byte),
 * or -1 with an error naming ``what``. */
static Py_ssize_t code_bytes(int mode, Py_ssize_t d, const char *what) {
    if ((mode != 8 && mode != 4 && mode != 5) || (mode != 8 && d % 2)) {
        PyErr_Format(PyExc_ValueError, "%s: mode must be 8, 4 or 5 (4 and 5 with an even d), got %d", what, mode);
        return -1;
    }
    return mode == 8 ? d : d / 2;
}

static PyObject *py_rot_stats(PyObject *self, PyObject *args) {
    PyObject *objs[4];
    int kind;
    Py_ssize_t d;
    if (!PyArg_ParseTuple(args, "OinOOO", &objs[0], &kind, &d, &objs[1], &objs[2], &objs[3])) return NULL;
    Py_buffer held[4];
    if (get_buffers(objs, held, 4, 1) < 0) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = rot_rows(&held[0], kind, d);
    if (n < 0) goto done;
    if (held[1].len != n * 4 || held[2].len != n * 4 || held[3].len != n * 4) {
        PyErr_SetString(PyExc_ValueError, "rot_stats: e int32 [N], mn and mx fp32 [N]");
        goto done;
    }
    float *y = PyMem_Malloc((size_t)d * sizeof(float));
    if (y == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    stats_rows(held[0].buf, kind, n, d, y, held[1].buf, held[2].buf, held[3].buf);
    Py_END_ALLOW_THREADS
    PyMem_Free(y);
    result = Py_NewRef(Py_None);
done:
    release_buffers(held, 4);
    return result;
}

static PyObject *py_rot_quantize(PyObject *self, PyObject *args) {
    PyObject *objs[4];
    int kind, mode;
    Py_ssize_t d;
    if (!PyArg_ParseTuple(args, "OiniOOO", &objs[0], &kind, &d, &mode, &objs[1], &objs[2], &objs[3])) return NULL;
    Py_buffer held[4];
    if (get_buffers(objs, held, 4, 3) < 0) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = rot_rows(&held[0], kind, d);
    if (n < 0) goto done;
    Py_ssize_t row_bytes = code_bytes(mode, d, "rot_quantize");
    if (row_bytes < 0) goto done;
    if (held[1].len != n * 4 || held[2].len != n * 4 || held[3].len != n * row_bytes) {
        PyErr_SetString(PyExc_ValueError, "rot_quantize: inv and z fp32 [N], out [N, d] int8 (mode 8) or [N, d/2] uint8");
        goto done;
    }
    float *y = PyMem_Malloc((size_t)d * sizeof(float));
    if (y == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    quantize_rows(held[0].buf, kind, n, d, mode, held[1].buf, held[2].buf, y, held[3].buf);
    Py_END_ALLOW_THREADS
    PyMem_Free(y);
    result = Py_NewRef(Py_None);
done:
    release_buffers(held, 4);
    return result;
}

/* A decoder's buffers: codes, scale, zero or table (read), out (written), and its
 * optional spans; on failure nothing is held. */
static int decoder_args(PyObject **objs, PyObject *spans_obj, Py_buffer *held, OutSpans *spans) {
    if (out_spans_get(spans_obj, spans) < 0) return -1;
    if (get_buffers(objs, held, 4, 3) == 0) return 0;
    out_spans_release(spans);
    return -1;
}

/* 0 when ``kind`` is 0 (fp32) or 1 (bf16) and ``d`` a row length whose byte products
 * cannot wrap; else -1 with a ValueError naming ``what``. Checked before any arithmetic
 * on ``d``. */
static int kind_and_d(const char *what, int kind, Py_ssize_t d) {
    if ((kind == 0 || kind == 1) && d > 0 && d <= PY_SSIZE_T_MAX / 16) return 0;
    PyErr_Format(PyExc_ValueError, "%s: kind 0 (fp32) or 1 (bf16) and 0 < d <= %zd, got kind %d, d %zd", what,
                 PY_SSIZE_T_MAX / 16, kind, d);
    return -1;
}

/* The rows of ``d`` values of ``kind`` in every span of ``iov``, or -1 with a ValueError
 * naming ``what`` when a span is not whole rows (the rows a chunk's spans in a cache hold). */
static Py_ssize_t span_rows(const char *what, const struct iovec *iov, size_t count, int kind, Py_ssize_t d) {
    const size_t row = (size_t)(kind == 1 ? 2 : 4) * (size_t)d;
    size_t bytes = 0; /* at most PY_SSIZE_T_MAX, so that no product of the rows with a row's size can wrap */
    for (size_t i = 0; i < count; i++) {
        if (iov[i].iov_len % row) {
            PyErr_Format(PyExc_ValueError, "%s: span %zu holds %zu bytes, not whole rows of %zu", what, i,
                         iov[i].iov_len, row);
            return -1;
        }
        if (iov[i].iov_len > (size_t)PY_SSIZE_T_MAX - bytes) {
            PyErr_Format(PyExc_ValueError, "%s: the spans hold more than %zd bytes in all (span %zu)", what,
                         PY_SSIZE_T_MAX, i);
            return -1;
        }
        bytes += iov[i].iov_len;
    }
    return (Py_ssize_t)(bytes / row);
}

/* rot_encode_spans(iov, kind, d, mode, params, codes): int8h's (mode 8) or int4h's values'
 * (mode 4) parameters, uint8 [4 N], and codes, int8 [N, d] or uint8 [N, d/2], of the rows
 * in the spans (whole rows, in order), in one pass (encode_rows). */
static PyObject *py_rot_encode_spans(PyObject *self, PyObject *args) {
    PyObject *objs[2], *iov_obj;
    Py_ssize_t d;
    int kind, mode;
    if (!PyArg_ParseTuple(args, "OiniOO", &iov_obj, &kind, &d, &mode, &objs[0], &objs[1])) return NULL;
    Py_buffer view, held[2];
    struct iovec *iov;
    size_t count;
    if (get_iov(iov_obj, &view, &iov, &count) < 0) return NULL;
    if (get_buffers(objs, held, 2, 0) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *result = NULL;
    float *y = NULL;
    if (kind_and_d("rot_encode_spans", kind, d) < 0) goto done;
    if (mode != 8 && mode != 4) {
        PyErr_Format(PyExc_ValueError, "rot_encode_spans: mode 8 (int8h) or 4 (int4h's values), got %d", mode);
        goto done;
    }
    Py_ssize_t row_bytes = code_bytes(mode, d, "rot_encode_spans");
    if (row_bytes < 0) goto done;
    Py_ssize_t n = span_rows("rot_encode_spans", iov, count, kind, d);
    if (n < 0) goto done;
    if (held[0].len != n * 4 || held[1].len != n * row_bytes) {
        PyErr_Format(PyExc_ValueError, "rot_encode_spans: params 4 bytes a row, codes %zd bytes a row, for the spans' "
                     "%zd rows; got %zd and %zd bytes", row_bytes, n, held[0].len, held[1].len);
        goto done;
    }
    if ((y = PyMem_Malloc((size_t)d * sizeof(float))) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const size_t row = (size_t)(kind == 1 ? 2 : 4) * (size_t)d;
    Py_BEGIN_ALLOW_THREADS
    uint8_t *params = held[0].buf;
    for (size_t i = 0, r = 0; i < count; r += iov[i].iov_len / row, i++)
        encode_rows(iov[i].iov_base, kind, (Py_ssize_t)(iov[i].iov_len / row), d, mode, y,
                    params + (mode == 8 ? 4 : 2) * r, (uint8_t *)held[1].buf + r * (size_t)row_bytes, n);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(y);
    release_buffers(held, 2);
    PyBuffer_Release(&view);
    return result;
}

/* rot_encode4a(x, kind, d, heads, log_block, base, code, zeros, codes): an int4a value
 * window's compact rows ``x`` (fp32, kind 0, or bf16 bits, kind 1, [N, d], N a multiple
 * of ``heads``, rows in [token][head] order) coded as allocated.py's encode_rows codes
 * them in torch: ``base`` int16 [heads], ``code`` uint8 [N] (the scale bytes), ``zeros``
 * uint8 [heads, ceil(N / heads / 2)] (each head's zero-points, two tokens a byte, the
 * earlier in the low nibble) and ``codes`` uint8 [N, d / 2] (rot_quantize's mode 5),
 * most rows rotated once (encode_rows4a). */
static PyObject *py_rot_encode4a(PyObject *self, PyObject *args) {
    PyObject *objs[5];
    Py_ssize_t d, heads;
    int kind, log_block;
    if (!PyArg_ParseTuple(args, "OinniOOOO", &objs[0], &kind, &d, &heads, &log_block, &objs[1], &objs[2], &objs[3],
                          &objs[4]))
        return NULL;
    Py_buffer held[5];
    if (get_buffers(objs, held, 5, 1) < 0) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = kind_and_d("rot_encode4a", kind, d) < 0 ? -1 : rot_rows(&held[0], kind, d);
    if (n < 0) goto done;
    const Py_ssize_t later = heads > 0 ? n / heads : 0, half = (later + 1) / 2;
    if (heads <= 0 || heads > PY_SSIZE_T_MAX / 16 || n % heads || d % 2 || log_block < 0 || log_block > 8 ||
        held[1].len != heads * 2 ||
        held[2].len != n || held[3].len != heads * half || held[4].len != n * (d / 2)) {
        PyErr_Format(PyExc_ValueError, "rot_encode4a: x [N, d] with N a multiple of heads and d even, base int16 "
                     "[heads], code uint8 [N], zeros uint8 [heads, ceil(N / heads / 2)], codes uint8 [N, d / 2], "
                     "0 <= log_block <= 8; got N %zd, d %zd, heads %zd, log_block %d, %zd base, %zd code, %zd zeros "
                     "and %zd codes bytes", n, d, heads, log_block, held[1].len, held[2].len, held[3].len,
                     held[4].len);
        goto done;
    }
    /* y, then k, e, mn and the zero-point for each row, then the bases (copied out at the end:
     * ``base`` may be unaligned) */
    char *work = PyMem_Malloc((size_t)d * sizeof(float) + 8 + (size_t)n * 17 + (size_t)heads * sizeof(int16_t));
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    float *y = (float *)work;
    int64_t *k = (int64_t *)(work + (((size_t)d * sizeof(float) + 7) & ~(size_t)7));
    int32_t *e = (int32_t *)(k + n);
    float *mn = (float *)(e + n);
    int16_t *base = (int16_t *)(mn + n);
    uint8_t *zr = (uint8_t *)(base + heads);
    Py_BEGIN_ALLOW_THREADS
    encode_rows4a(held[0].buf, kind, n, heads, d, log_block, y, k, e, mn, zr, base, held[2].buf, held[3].buf,
                  held[4].buf);
    memcpy(held[1].buf, base, (size_t)heads * sizeof(int16_t));
    Py_END_ALLOW_THREADS
    PyMem_Free(work);
    result = Py_NewRef(Py_None);
done:
    release_buffers(held, 5);
    return result;
}

static PyObject *py_rot_dequantize(PyObject *self, PyObject *args) {
    PyObject *objs[4], *spans_obj = Py_None;
    int kind, mode;
    Py_ssize_t d;
    if (!PyArg_ParseTuple(args, "OinOOOi|O", &objs[0], &mode, &d, &objs[1], &objs[2], &objs[3], &kind, &spans_obj))
        return NULL;
    OutSpans spans;
    Py_buffer held[4];
    if (decoder_args(objs, spans_obj, held, &spans) < 0) return NULL;
    PyObject *result = NULL;
    const int spilled = spans.given;
    const size_t total = spans.total;
    if (kind_and_d("rot_dequantize", kind, d) < 0) goto done;
    Py_ssize_t row_bytes = code_bytes(mode, d, "rot_dequantize");
    if (row_bytes < 0) goto done;
    const Py_ssize_t item = kind == 1 ? 2 : 4, n = held[0].len / row_bytes;
    /* without spans, the rows' count is out's; with them, out is a work buffer of at least a row */
    if (!spilled && rot_rows(&held[3], kind, d) < 0) goto done;
    if (held[0].len % row_bytes || held[1].len != n * 4 || held[2].len != n * 4 ||
        (spilled ? held[3].len < d * item || total != (size_t)(n * d * item) : held[3].len != n * d * item)) {
        PyErr_Format(PyExc_ValueError, "rot_dequantize: codes [N, d] int8 (mode 8) or [N, d/2] uint8, scale and zero "
                     "fp32 [N], out [N, d] of kind %d (with spans: at least a row, the spans taking [N, d]); got %zd "
                     "code bytes, %zd and %zd scale and zero bytes, %zd out bytes, %zu span bytes", kind, held[0].len,
                     held[1].len, held[2].len, held[3].len, total);
        goto done;
    }
    float *y = PyMem_Malloc(2 * (size_t)d * sizeof(float));
    if (y == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (!spilled) {
        dequantize_rows(held[0].buf, mode, n, d, held[1].buf, held[2].buf, y, held[3].buf, kind);
    } else { /* a piece of rows at a time in ``out``, in cache, then out to the spans */
        const Py_ssize_t room = held[3].len / (d * item);
        SpanCursor at = {spans.iov, 0, 0};
        for (Py_ssize_t r = 0; r < n; r += room) {
            const Py_ssize_t rows = n - r < room ? n - r : room;
            dequantize_rows((const char *)held[0].buf + r * row_bytes, mode, rows, d, (const float *)held[1].buf + r,
                            (const float *)held[2].buf + r, y, held[3].buf, kind);
            spill(&at, held[3].buf, (size_t)(rows * d * item));
        }
        store_fence();
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(y);
    result = Py_NewRef(Py_None);
done:
    out_spans_release(&spans);
    release_buffers(held, 4);
    return result;
}

/* fp8_quantize(x, kind, d, scale, codes): fp8 rows encoded (kvwire/codec/fp8.py), each
 * row of ``d`` values read as fp32 (kind 0) or bf16 (kind 1, the bits as uint16):
 *   amax = max |x| over the finite values (0 when none); S = (amax + 0) / 448, 1 when 0;
 *   inv = 1 / S; c = e4m3(clamp(x inv, -448, 448)), nearest, ties to even; NaN -> 0x7F
 * (``scale``: fp32 [N]; ``codes``: uint8 [N, d]), as torch's division, reciprocal,
 * multiply, clamp and float8_e4m3fn conversion give (tests/test_codecs.py compares them,
 * every halfway point between two codes included). */
static inline uint8_t e4m3_code(float q) {
    uint32_t bits;
    memcpy(&bits, &q, 4);
    const uint32_t sign = (bits >> 24) & 0x80u, ab = bits & 0x7FFFFFFFu;
    float a;
    memcpy(&a, &ab, 4);
    const int small = a < 0.015625f; /* below 2^-6: subnormal codes, steps of 2^-9 (8 steps: code 8, 2^-6) */
    const float steps = (small ? a : 0.0f) * 512.0f + ROUNDER; /* the count of steps, rounded, in the low bits */
    uint32_t sub;
    memcpy(&sub, &steps, 4);
    const uint32_t r = ab + 0x7FFFFu + ((ab >> 20) & 1u); /* the 20 bits below the 3 kept rounded off */
    const uint32_t code = (small ? sub - 0x4B400000u : (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u)) | sign;
    return (uint8_t)(q != q ? 0x7Fu : code);
}

typedef uint8_t v32b __attribute__((vector_size(32)));
#if defined(__clang__)
#define PICK_LOW_BYTES(v) \
    __builtin_shufflevector(v, v, 0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, \
                            0, 0, 0, 0, 0, 0, 0, 0)
#else
#define PICK_LOW_BYTES(v) __builtin_shuffle(v, (v32b){0, 4, 8, 12, 16, 20, 24, 28})
#endif

ALWAYS_INLINE v8u select8u(v8i mask, v8u a, v8u b) { return ((v8u)mask & a) | (~(v8u)mask & b); }

/* e4m3_code of 8 values at once. */
ALWAYS_INLINE v8u e4m3_codes8(v8f q) {
    const v8u bits = (v8u)q, sign = (bits >> 24) & 0x80u, ab = bits & 0x7FFFFFFFu;
    const v8f a = (v8f)ab;
    const v8i small = a < 0.015625f;
    const v8u sub = (v8u)(select8(small, a, (v8f){0}) * 512.0f + ROUNDER) - 0x4B400000u;
    const v8u r = ab + 0x7FFFFu + ((ab >> 20) & 1u);
    const v8u code = select8u(small, sub, (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u)) | sign;
    return select8u(q != q, (v8u){0x7F, 0x7F, 0x7F, 0x7F, 0x7F, 0x7F, 0x7F, 0x7F}, code);
}

ALWAYS_INLINE v8u row_bits8(const void *x, int kind, Py_ssize_t k) {
    v8u bits;
    if (kind)
        bits = bf16_bits8((const uint16_t *)x + k);
    else
        memcpy(&bits, (const float *)x + k, sizeof bits);
    return bits;
}

/* The larger of ``m`` and each finite |x| of the 8 values ``bits``, lane by lane. */
ALWAYS_INLINE v8f finite_max8(v8f m, v8u bits) {
    const v8u ab = bits & 0x7FFFFFFFu;
    const v8f a = (v8f)ab;
    return select8(((v8i)ab < 0x7F800000) & (a > m), a, m); /* finite only (the sign bit is clear) */
}

SIMD_CLONES
static void fp8_encode_rows(const void *x, int kind, Py_ssize_t n, Py_ssize_t d, float *scale, uint8_t *codes) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const Py_ssize_t row = i * d, vec = d % 8 == 0 ? d : 0;
        v8f m8[4] = {{0}, {0}, {0}, {0}}; /* four running maxima (load_row's reason); |x| has no -0 */
        Py_ssize_t j = 0;
        for (; j + 32 <= vec; j += 32) {
            m8[0] = finite_max8(m8[0], row_bits8(x, kind, row + j));
            m8[1] = finite_max8(m8[1], row_bits8(x, kind, row + j + 8));
            m8[2] = finite_max8(m8[2], row_bits8(x, kind, row + j + 16));
            m8[3] = finite_max8(m8[3], row_bits8(x, kind, row + j + 24));
        }
        for (; j < vec; j += 8) m8[0] = finite_max8(m8[0], row_bits8(x, kind, row + j));
        float m = hmax8(max8(max8(m8[0], m8[1]), max8(m8[2], m8[3])));
        for (Py_ssize_t j = vec; j < d; j++) {
            const float a = fabsf(widen(x, kind, row + j));
            m = a <= FLT_MAX && a > m ? a : m; /* NaN and inf compare false with FLT_MAX */
        }
        float s = (m + 0.0f) / 448.0f;
        if (s == 0.0f) s = 1.0f;
        const float inv = 1.0f / s;
        scale[i] = s;
        uint8_t *c = codes + row;
        for (Py_ssize_t j = 0; j < vec; j += 8) {
            v8f q = (v8f)row_bits8(x, kind, row + j) * inv;
            q = select8(q < -448.0f, (v8f){0} - 448.0f, q); /* NaN stays NaN */
            q = select8(q > 448.0f, (v8f){0} + 448.0f, q);
            const v32b code = PICK_LOW_BYTES((v32b)e4m3_codes8(q)); /* each lane's low byte, in order */
            memcpy(c + j, &code, 8);
        }
        for (Py_ssize_t j = vec; j < d; j++) {
            float q = widen(x, kind, row + j) * inv;
            q = q < -448.0f ? -448.0f : q > 448.0f ? 448.0f : q; /* NaN stays NaN */
            c[j] = e4m3_code(q);
        }
    }
}

static PyObject *py_fp8_quantize(PyObject *self, PyObject *args) {
    PyObject *objs[3];
    Py_ssize_t d;
    int kind;
    if (!PyArg_ParseTuple(args, "OinOO", &objs[0], &kind, &d, &objs[1], &objs[2])) return NULL;
    Py_buffer held[3];
    if (get_buffers(objs, held, 3, 1) < 0) return NULL;
    PyObject *result = NULL;
    Py_ssize_t item = kind == 1 ? 2 : 4;
    if ((kind != 0 && kind != 1) || d <= 0 || d > PY_SSIZE_T_MAX / 16 || held[0].len % (item * d) ||
        held[1].len != held[0].len / (item * d) * 4 || held[2].len != held[0].len / item) {
        PyErr_Format(PyExc_ValueError, "fp8_quantize: x fp32 (kind 0) or bf16 bits (kind 1) [N, d], scale fp32 [N], "
                     "codes uint8 [N, d]; got %zd x bytes, kind %d, d %zd, %zd scale bytes, %zd code bytes",
                     held[0].len, kind, d, held[1].len, held[2].len);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    fp8_encode_rows(held[0].buf, kind, held[0].len / (item * d), d, held[1].buf, held[2].buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release_buffers(held, 3);
    return result;
}

/* fp8_quantize_spans(iov, kind, d, scale, codes): fp8_quantize of rows that lie in spans
 * (a cache's blocks or tokens, each span whole rows of ``d`` values), read where they lie:
 * no gathered copy of the chunk first. */
static PyObject *py_fp8_quantize_spans(PyObject *self, PyObject *args) {
    PyObject *objs[2], *iov_obj;
    Py_ssize_t d;
    int kind;
    if (!PyArg_ParseTuple(args, "OinOO", &iov_obj, &kind, &d, &objs[0], &objs[1])) return NULL;
    Py_buffer view, held[2];
    struct iovec *iov;
    size_t count, rows = 0;
    if (get_iov(iov_obj, &view, &iov, &count) < 0) return NULL;
    if (get_buffers(objs, held, 2, 0) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *result = NULL;
    if (kind_and_d("fp8_quantize_spans", kind, d) < 0) goto done;
    const size_t row = (size_t)(kind == 1 ? 2 : 4) * (size_t)d;
    int whole = 1;
    for (size_t i = 0; i < count; i++) {
        whole &= iov[i].iov_len % row == 0 && iov[i].iov_len / row <= (size_t)PY_SSIZE_T_MAX / row - rows;
        rows += iov[i].iov_len / row; /* checked above not to pass PY_SSIZE_T_MAX bytes in all */
    }
    if (!whole || held[0].len != (Py_ssize_t)rows * 4 || held[1].len != (Py_ssize_t)rows * d) {
        PyErr_Format(PyExc_ValueError, "fp8_quantize_spans: spans of whole rows of d fp32 (kind 0) or bf16 (kind 1) "
                     "values, scale fp32 [N], codes uint8 [N, d]; got %zu spans of %zu rows%s, kind %d, d %zd, %zd "
                     "scale bytes, %zd code bytes", count, rows, whole ? "" : " (not all whole)", kind, d,
                     held[0].len, held[1].len);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS float *scale = held[0].buf;
    uint8_t *codes = held[1].buf;
    for (size_t i = 0, r = 0; i < count; r += iov[i].iov_len / row, i++)
        fp8_encode_rows(iov[i].iov_base, kind, (Py_ssize_t)(iov[i].iov_len / row), d, scale + r, codes + r * d);
    Py_END_ALLOW_THREADS result = Py_NewRef(Py_None);
done:
    release_buffers(held, 2);
    PyBuffer_Release(&view);
    return result;
}

/* fp8_dequantize(codes, d, scale, table, out, kind, spans=None): fp8 rows decoded (kvwire/codec/fp8.py):
 * x' = table[c] * S, one fp32 multiply per value (``table``: fp32 [256], the value of each
 * E4M3 code, made by torch's conversion; ``scale``: fp32 [N], one per row of ``d`` codes),
 * written as fp32 (kind 0) or bf16 (kind 1: nearest, ties to even), every NaN the
 * canonical one, as the torch path's index_select, mul and to_cache_dtype give. Given
 * ``spans`` (an iov array taking exactly the decoded rows), ``out`` is a work buffer of at
 * least one row instead: rows are decoded into it a piece at a time, where they stay in
 * cache, and copied to the spans with copy_streaming (a cache's rows, decoded in place). */
SIMD_CLONES
static void fp8_rows(const uint8_t *codes, Py_ssize_t n, Py_ssize_t d, const float *scale, const float *table,
                     void *out, int kind) {
    const uint32_t nan_bits = 0x7FC00000u;
    float canonical_nan;
    memcpy(&canonical_nan, &nan_bits, 4);
    for (Py_ssize_t i = 0; i < n; i++) {
        const float s = scale[i];
        const uint8_t *c = codes + i * d;
        if (kind == 1) {
            uint16_t *to = (uint16_t *)out + i * d;
            for (Py_ssize_t j = 0; j < d; j++) to[j] = float_to_bf16(table[c[j]] * s);
        } else {
            float *to = (float *)out + i * d;
            for (Py_ssize_t j = 0; j < d; j++) {
                float v = table[c[j]] * s;
                to[j] = v == v ? v : canonical_nan;
            }
        }
    }
}

static PyObject *py_fp8_dequantize(PyObject *self, PyObject *args) {
    PyObject *objs[4], *spans_obj = Py_None;
    Py_ssize_t d;
    int kind;
    if (!PyArg_ParseTuple(args, "OnOOOi|O", &objs[0], &d, &objs[1], &objs[2], &objs[3], &kind, &spans_obj))
        return NULL;
    OutSpans spans;
    Py_buffer held[4];
    if (decoder_args(objs, spans_obj, held, &spans) < 0) return NULL;
    PyObject *result = NULL;
    if (kind_and_d("fp8_dequantize", kind, d) < 0) goto done;
    const Py_ssize_t item = kind == 1 ? 2 : 4, n = held[0].len / d;
    const size_t total = spans.total;
    const int spilled = spans.given;
    const Py_ssize_t values = held[0].len; /* one code per value */
    if (values % d || held[1].len != n * 4 || held[2].len != 256 * 4 ||
        (spilled ? held[3].len < d * item || total != (size_t)(values * item) : held[3].len != values * item)) {
        PyErr_Format(PyExc_ValueError, "fp8_dequantize: codes uint8 [N, d], scale fp32 [N], table fp32 [256], out "
                     "fp32 (kind 0) or bf16 bits (kind 1) [N, d] (with spans: at least a row, the spans taking "
                     "[N, d]); got %zd code bytes, d %zd, %zd scale bytes, %zd table bytes, %zd out bytes, kind %d, "
                     "%zu span bytes", held[0].len, d, held[1].len, held[2].len, held[3].len, kind, total);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (!spilled) {
        fp8_rows(held[0].buf, n, d, held[1].buf, held[2].buf, held[3].buf, kind);
    } else { /* a piece of rows at a time in ``out``, in cache, then out to the spans */
        const Py_ssize_t room = held[3].len / (d * item);
        SpanCursor at = {spans.iov, 0, 0};
        for (Py_ssize_t r = 0; r < n; r += room) {
            const Py_ssize_t rows = n - r < room ? n - r : room;
            fp8_rows((const uint8_t *)held[0].buf + r * d, rows, d, (const float *)held[1].buf + r, held[2].buf,
                     held[3].buf, kind);
            spill(&at, held[3].buf, (size_t)(rows * d * item));
        }
        store_fence();
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    out_spans_release(&spans);
    release_buffers(held, 4);
    return result;
}

/* int4 (kvwire/codec/int4.py): value groups (rows of ``g`` values, one fp16 scale and
 * zero-point each) encoded in one pass, and both kinds of group decoded straight into a
 * cache's rows. fp16 conversions are done on the bits: half_bits rounds a finite fp32 of
 * at most 65504 in magnitude to nearest, ties to even (the parameters are clamped to that
 * range first, as the format says), half_value widens any fp16 exactly. */
static inline uint16_t half_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, ab = x & 0x7FFFFFFFu;
    if (ab < 0x38800000u) { /* below 2^-14: a subnormal fp16 (or zero), steps of 2^-24 */
        float a;
        memcpy(&a, &ab, 4);
        return (uint16_t)(sign | (uint32_t)((a * 16777216.0f + ROUNDER) - ROUNDER)); /* 1024 is 2^-14's bits */
    }
    const uint32_t r = ab + 0xFFFu + ((ab >> 13) & 1u); /* the 13 bits below the 10 kept rounded off */
    return (uint16_t)(sign | ((r >> 13) - (112u << 10)));  /* exponent bias 127 -> 15 */
}

static inline float half_value(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3FFu;
    uint32_t bits;
    if (e == 0) { /* zero or subnormal: m 2^-24, exact in fp32 */
        float v = (float)m * 5.9604644775390625e-8f;
        memcpy(&bits, &v, 4);
        bits |= sign;
    } else {
        bits = sign | (e == 31 ? 0x7F800000u : (e + 112u) << 23) | (m << 13); /* inf and NaN keep their payload */
    }
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

/* One int4 group's parameters from its finite extremes (lo > hi: none finite), as
 * int4_params and int4_inverse give them: the fp16 bits of scale and zero, and the fp32
 * zero and 1 / scale (0 where the scale is not positive) the codes are made with. */
static inline void int4_group_params(float lo, float hi, uint16_t *scale, uint16_t *zero, float *z, float *inv) {
    const int none = lo > hi;
    float mn = (none ? 0.0f : lo) + 0.0f, mx = (none ? 0.0f : hi) + 0.0f; /* + 0: no -0 */
    mn = mn < -65504.0f ? -65504.0f : mn > 65504.0f ? 65504.0f : mn;
    *zero = half_bits(mn);
    *z = half_value(*zero);
    float s = (mx - *z) / 15.0f;
    s = s < -65504.0f ? -65504.0f : s > 65504.0f ? 65504.0f : s;
    *scale = half_bits(s);
    const float sv = half_value(*scale);
    *inv = sv > 0.0f ? 1.0f / sv : 0.0f;
}

/* The steps int4's loops share: running finite extremes (NaN and inf left out; a vector
 * of 8 lanes or one value), a code clamp(rint((x - z) inv), 0, 15) with NaN -> 0 (as a
 * float), and codes packed two a byte, the even one low. */
ALWAYS_INLINE void extremes8(v8u bits, v8f *lo, v8f *hi) {
    const v8i finite = (v8i)((bits & 0x7F800000u) != 0x7F800000u);
    const v8f v = (v8f)bits;
    *lo = select8(finite & (v < *lo), v, *lo);
    *hi = select8(finite & (v > *hi), v, *hi);
}

ALWAYS_INLINE void extremes1(float v, float *lo, float *hi) {
    const int finite = v > -INFINITY && v < INFINITY; /* NaN compares false both ways */
    *lo = finite && v < *lo ? v : *lo;
    *hi = finite && v > *hi ? v : *hi;
}

ALWAYS_INLINE v8f codes8(v8u bits, v8f z, v8f inv) {
    const v8f q = ((v8f)bits - z) * inv;
    return (min8(select8(q > 0.0f, q, (v8f){0}), (v8f){0} + 15.0f) + ROUNDER) - ROUNDER; /* NaN, below 0 -> 0 */
}

ALWAYS_INLINE float code1(float x, float z, float inv) {
    float q = (x - z) * inv;
    q = q > 0.0f ? q : 0.0f;
    q = q < 15.0f ? q : 15.0f;
    return (q + ROUNDER) - ROUNDER;
}

ALWAYS_INLINE void pack_codes(const float *v, Py_ssize_t n, uint8_t *out) {
    for (Py_ssize_t j = 0; j < n / 2; j++) out[j] = (uint8_t)((int)v[2 * j] | ((int)v[2 * j + 1] << 4));
}

/* half_bits, half_value and int4_group_params on 8 lanes (finite parameters only: no
 * lane of half_value8 is inf or NaN, since every parameter is clamped first). */
ALWAYS_INLINE v8u half_bits8(v8f f) {
    const v8u x = (v8u)f, sign = (x >> 16) & 0x8000u, ab = x & 0x7FFFFFFFu;
    const v8f steps = ((v8f)ab * 16777216.0f + ROUNDER) - ROUNDER; /* the subnormal lanes' count of 2^-24 */
    const v8u sub = (v8u)__builtin_convertvector(steps, v8i);
    const v8u r = ab + 0xFFFu + ((ab >> 13) & 1u);
    return sign | select8u((v8i)(ab < 0x38800000u), sub, (r >> 13) - (112u << 10));
}

ALWAYS_INLINE v8f half_value8(v8u h) {
    const v8u sign = (h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3FFu;
    const v8u sub = (v8u)(__builtin_convertvector((v8i)m, v8f) * 5.9604644775390625e-8f);
    return (v8f)(sign | select8u((v8i)(e == 0u), sub, ((e + 112u) << 23) | (m << 13)));
}

ALWAYS_INLINE void int4_group_params8(v8f lo, v8f hi, uint16_t *scale, uint16_t *zero, float *z, float *inv) {
    const v8i none = (v8i)(lo > hi);
    const v8f top = (v8f){0} + 65504.0f, bottom = (v8f){0} - 65504.0f;
    v8f mn = select8(none, (v8f){0}, lo) + 0.0f, mx = select8(none, (v8f){0}, hi) + 0.0f; /* + 0: no -0 */
    mn = min8(max8(mn, bottom), top);
    const v8u zb = half_bits8(mn);
    const v8f zv = half_value8(zb);
    const v8f sc = min8(max8((mx - zv) / 15.0f, bottom), top);
    const v8u sb = half_bits8(sc);
    const v8f sv = half_value8(sb);
    store8(z, zv);
    store8(inv, select8((v8i)(sv > 0.0f), ((v8f){0} + 1.0f) / sv, (v8f){0}));
    for (int k = 0; k < 8; k++) {
        scale[k] = (uint16_t)sb[k];
        zero[k] = (uint16_t)zb[k];
    }
}

/* int4's value rows: each of the ``n`` rows of ``x`` is one group of ``g`` values (fp32,
 * kind 0, or bf16 bits, kind 1): its scale and zero-point (fp16 bits) and its codes,
 * clamp(rint((x - z) inv), 0, 15) with NaN -> 0, two per byte, the even one low; ``v``
 * holds g floats (a row's codes before they are packed). Eight rows at a time: their
 * extremes, then their parameters on 8 lanes, then their codes (the rows, 1 KiB of bf16
 * at g = 64, still in cache). */
SIMD_CLONES
static void int4_encode_rows(const void *x, int kind, Py_ssize_t n, Py_ssize_t g, uint16_t *scale, uint16_t *zero,
                             uint8_t *codes, float *v) {
    const Py_ssize_t vec = g % 8 == 0 ? g : 0;
    float lo[8], hi[8], z[8], inv[8];
    for (Py_ssize_t first = 0; first < n; first += 8) {
        const int rows = n - first < 8 ? (int)(n - first) : 8;
        for (int k = 0; k < rows; k++) {
            const Py_ssize_t row = (first + k) * g;
            v8f lo8 = (v8f){0} + INFINITY, hi8 = (v8f){0} - INFINITY;
            for (Py_ssize_t j = 0; j < vec; j += 8) extremes8(row_bits8(x, kind, row + j), &lo8, &hi8);
            lo[k] = hmin8(lo8);
            hi[k] = hmax8(hi8);
            for (Py_ssize_t j = vec; j < g; j++) extremes1(widen(x, kind, row + j), lo + k, hi + k);
        }
        if (rows == 8)
            int4_group_params8(load8(lo), load8(hi), scale + first, zero + first, z, inv);
        else
            for (int k = 0; k < rows; k++)
                int4_group_params(lo[k], hi[k], scale + first + k, zero + first + k, z + k, inv + k);
        for (int k = 0; k < rows; k++) {
            const Py_ssize_t row = (first + k) * g;
            const v8f z8 = (v8f){0} + z[k], inv8 = (v8f){0} + inv[k];
            for (Py_ssize_t j = 0; j < vec; j += 8) store8(v + j, codes8(row_bits8(x, kind, row + j), z8, inv8));
            for (Py_ssize_t j = vec; j < g; j++) v[j] = code1(widen(x, kind, row + j), z[k], inv[k]);
            pack_codes(v, g, codes + row / 2);
        }
    }
}

/* The rows of ``g`` values of ``kind`` in ``len`` bytes, or -1 with a ValueError naming
 * what is wrong (g even: two codes a byte). */
static int int4_shape(const char *what, int kind, Py_ssize_t g, Py_ssize_t scale_len, Py_ssize_t zero_len,
                      Py_ssize_t code_len, Py_ssize_t rows) {
    if (g % 2 == 0 && scale_len == rows * 2 && zero_len == rows * 2 && code_len == rows * (g / 2)) return 0;
    PyErr_Format(PyExc_ValueError, "%s: rows of g values, g even, fp32 (kind 0) or bf16 (kind 1), scale and zero "
                 "fp16 bits [N], codes uint8 [N, g / 2]; got %zd rows, g %zd, kind %d, %zd scale bytes, %zd zero "
                 "bytes, %zd code bytes", what, rows, g, kind, scale_len, zero_len, code_len);
    return -1;
}

/* int4_quantize(x, kind, g, scale, zero, codes): int4's value groups of contiguous rows
 * ``x`` [N, g] (fp32, kind 0, or bf16 bits, kind 1): scale and zero fp16 bits [N], codes
 * uint8 [N, g / 2], the bytes int4.py's torch path gives (tests/test_codecs.py). */
static PyObject *py_int4_quantize(PyObject *self, PyObject *args) {
    PyObject *objs[4];
    Py_ssize_t g;
    int kind;
    if (!PyArg_ParseTuple(args, "OinOOO", &objs[0], &kind, &g, &objs[1], &objs[2], &objs[3])) return NULL;
    Py_buffer held[4];
    if (get_buffers(objs, held, 4, 1) < 0) return NULL;
    PyObject *result = NULL;
    if (kind_and_d("int4_quantize", kind, g) < 0) goto done;
    const Py_ssize_t item = kind == 1 ? 2 : 4, rows = held[0].len / (item * g);
    if (held[0].len != rows * item * g) {
        PyErr_Format(PyExc_ValueError, "int4_quantize: x holds %zd bytes, not whole rows of %zd values of kind %d",
                     held[0].len, g, kind);
        goto done;
    }
    if (int4_shape("int4_quantize", kind, g, held[1].len, held[2].len, held[3].len, rows) < 0) goto done;
    float *v = PyMem_Malloc((size_t)g * sizeof(float));
    if (v == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    int4_encode_rows(held[0].buf, kind, rows, g, held[1].buf, held[2].buf, held[3].buf, v);
    Py_END_ALLOW_THREADS
    PyMem_Free(v);
    result = Py_NewRef(Py_None);
done:
    release_buffers(held, 4);
    return result;
}

/* int4_quantize_spans(iov, kind, g, scale, zero, codes): int4_quantize of rows that lie in
 * spans (a cache's blocks or tokens, each span whole rows of g values), read where they
 * lie: no gathered copy of the chunk first. */
static PyObject *py_int4_quantize_spans(PyObject *self, PyObject *args) {
    PyObject *objs[3], *iov_obj;
    Py_ssize_t g;
    int kind;
    if (!PyArg_ParseTuple(args, "OinOOO", &iov_obj, &kind, &g, &objs[0], &objs[1], &objs[2])) return NULL;
    Py_buffer view, held[3];
    struct iovec *iov;
    size_t count;
    if (get_iov(iov_obj, &view, &iov, &count) < 0) return NULL;
    if (get_buffers(objs, held, 3, 0) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *result = NULL;
    if (kind_and_d("int4_quantize_spans", kind, g) < 0) goto done;
    const Py_ssize_t rows = span_rows("int4_quantize_spans", iov, count, kind, g);
    if (rows < 0 || int4_shape("int4_quantize_spans", kind, g, held[0].len, held[1].len, held[2].len, rows) < 0)
        goto done;
    float *v = PyMem_Malloc((size_t)g * sizeof(float));
    if (v == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const size_t row = (size_t)(kind == 1 ? 2 : 4) * (size_t)g;
    uint16_t *scale = held[0].buf, *zero = held[1].buf;
    uint8_t *codes = held[2].buf;
    for (size_t i = 0, r = 0; i < count; r += iov[i].iov_len / row, i++)
        int4_encode_rows(iov[i].iov_base, kind, (Py_ssize_t)(iov[i].iov_len / row), g, scale + r, zero + r,
                         codes + r * (size_t)(g / 2), v);
    Py_END_ALLOW_THREADS
    PyMem_Free(v);
    result = Py_NewRef(Py_None);
done:
    release_buffers(held, 3);
    PyBuffer_Release(&view);
    return result;
}

/* One int4 key group (kvwire/codec/int4.py): ``n`` rows of ``C`` values (fp32, kind 0, or
 * bf16 bits, kind 1) at ``row[0..n)``; per channel the finite extremes (``lo``, ``hi``),
 * then the parameters (``scale``, ``zero``: fp16 bits [C]; ``z``, ``inv``: fp32 [C]), then
 * each row's codes, packed into ``codes`` [n, C / 2] through ``v`` (C floats). The group's
 * rows are read twice, the second time from cache (a group is K rows: 16 rows of 8 bf16
 * heads of 128 are 32 KiB). */
SIMD_CLONES
static void int4_key_group(const void *const *row, Py_ssize_t n, int kind, Py_ssize_t C, float *lo, float *hi,
                           float *z, float *inv, uint16_t *scale, uint16_t *zero, uint8_t *codes, float *v) {
    const Py_ssize_t vec = C % 8 == 0 ? C : 0;
    for (Py_ssize_t c = 0; c < C; c++) {
        lo[c] = INFINITY;
        hi[c] = -INFINITY;
    }
    for (Py_ssize_t t = 0; t < n; t++) {
        const void *x = row[t];
        for (Py_ssize_t c = 0; c < vec; c += 8) {
            v8f l = load8(lo + c), h = load8(hi + c);
            extremes8(row_bits8(x, kind, c), &l, &h);
            store8(lo + c, l);
            store8(hi + c, h);
        }
        for (Py_ssize_t c = vec; c < C; c++) extremes1(widen(x, kind, c), lo + c, hi + c);
    }
    for (Py_ssize_t c = 0; c < vec; c += 8)
        int4_group_params8(load8(lo + c), load8(hi + c), scale + c, zero + c, z + c, inv + c);
    for (Py_ssize_t c = vec; c < C; c++) int4_group_params(lo[c], hi[c], scale + c, zero + c, z + c, inv + c);
    for (Py_ssize_t t = 0; t < n; t++) {
        const void *x = row[t];
        for (Py_ssize_t c = 0; c < vec; c += 8)
            store8(v + c, codes8(row_bits8(x, kind, c), load8(z + c), load8(inv + c)));
        for (Py_ssize_t c = vec; c < C; c++) v[c] = code1(widen(x, kind, c), z[c], inv[c]);
        pack_codes(v, C, codes + t * (C / 2));
    }
}

/* int4_key_quantize_spans(iov, kind, C, rows, scale, zero, codes): int4's key groups of R
 * rows of ``C`` values (a token's heads, fp32, kind 0, or bf16 bits, kind 1) lying in
 * spans (a cache's blocks, or a span per token; each span whole rows), read where they
 * lie: per group of ``rows`` rows (the last what is left) and channel, the fp16 scale and
 * zero-point (``scale``, ``zero``: fp16 bits [ceil(R / rows), C]) and the codes (``codes``
 * uint8 [R, C / 2]), the bytes int4.py's torch path gives (tests/test_codecs.py). */
static PyObject *py_int4_key_quantize_spans(PyObject *self, PyObject *args) {
    PyObject *objs[3], *iov_obj;
    Py_ssize_t C, rows;
    int kind;
    if (!PyArg_ParseTuple(args, "OinnOOO", &iov_obj, &kind, &C, &rows, &objs[0], &objs[1], &objs[2])) return NULL;
    Py_buffer view, held[3];
    struct iovec *iov;
    size_t count;
    if (get_iov(iov_obj, &view, &iov, &count) < 0) return NULL;
    if (get_buffers(objs, held, 3, 0) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *result = NULL;
    if (kind_and_d("int4_key_quantize_spans", kind, C) < 0) goto done;
    const Py_ssize_t R = span_rows("int4_key_quantize_spans", iov, count, kind, C);
    if (R < 0) goto done;
    const Py_ssize_t G = rows > 0 ? R / rows + (R % rows != 0) : -1; /* G C <= R C: no product below can wrap */
    if (C % 2 || rows <= 0 || held[0].len != G * C * 2 || held[1].len != G * C * 2 || held[2].len != R * (C / 2)) {
        PyErr_Format(PyExc_ValueError, "int4_key_quantize_spans: rows of C values, C even, groups of rows > 0 rows, "
                     "scale and zero fp16 bits [ceil(R / rows), C], codes uint8 [R, C / 2]; got %zd rows, C %zd, rows "
                     "%zd, %zd scale bytes, %zd zero bytes, %zd code bytes", R, C, rows, held[0].len, held[1].len,
                     held[2].len);
        goto done;
    }
    const Py_ssize_t most = rows < R ? rows : (R > 0 ? R : 1); /* the rows of the largest group */
    float *work = PyMem_Malloc(5 * (size_t)C * sizeof(float));
    const void **row = PyMem_Malloc((size_t)most * sizeof(void *));
    if (work == NULL || row == NULL) {
        PyMem_Free(work);
        PyMem_Free(row);
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const size_t bytes = (size_t)(kind == 1 ? 2 : 4) * (size_t)C;
    size_t span = 0, at = 0; /* the next row: ``at`` bytes into span ``span`` */
    for (Py_ssize_t g = 0; g < G; g++) {
        const Py_ssize_t n = R - g * rows < rows ? R - g * rows : rows;
        for (Py_ssize_t t = 0; t < n; t++) {
            while (at == iov[span].iov_len) { /* empty spans hold no rows */
                span++;
                at = 0;
            }
            row[t] = (const char *)iov[span].iov_base + at;
            at += bytes;
        }
        int4_key_group((const void *const *)row, n, kind, C, work, work + C, work + 2 * C, work + 3 * C,
                       (uint16_t *)held[0].buf + g * C, (uint16_t *)held[1].buf + g * C,
                       (uint8_t *)held[2].buf + g * rows * (C / 2), work + 4 * C);
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(work);
    PyMem_Free(row);
    result = Py_NewRef(Py_None);
done:
    release_buffers(held, 3);
    PyBuffer_Release(&view);
    return result;
}

/* Rows [first, first + n) of an int4 chunk of ``heads`` rows a token, ``d`` values a row,
 * decoded into ``out`` (fp32, kind 0, or bf16 bits, kind 1): x' = float(code) s + z, two
 * roundings, then the cache dtype (nearest, ties to even; every NaN the canonical one).
 * Keys (``key_rows`` > 0): the parameters of [t / key_rows, head, channel], widened into
 * ``work`` (2 heads d floats) once a group; values: those of each run of ``g`` values.
 * ``work`` then holds d more floats: the row in fp32. */
SIMD_CLONES
static void int4_decode_rows(const uint8_t *codes, const uint8_t *scale, const uint8_t *zero, Py_ssize_t first,
                             Py_ssize_t n, Py_ssize_t heads, Py_ssize_t d, Py_ssize_t g, Py_ssize_t key_rows,
                             float *work, void *out, int kind) {
    const uint32_t nan_bits = 0x7FC00000u; /* every NaN written as this one (kvwire/codec/base.py) */
    float canonical_nan, *y = work + 2 * heads * d;
    memcpy(&canonical_nan, &nan_bits, 4);
    Py_ssize_t widened = -1; /* the key group whose parameters are in ``work`` */
    for (Py_ssize_t i = 0; i < n; i++) {
        const Py_ssize_t r = first + i;
        const uint8_t *c = codes + r * (d / 2);
        for (Py_ssize_t j = 0; j < d / 2; j++) {
            y[2 * j] = (float)(c[j] & 0x0F);
            y[2 * j + 1] = (float)(c[j] >> 4);
        }
        if (key_rows) {
            const Py_ssize_t group = r / heads / key_rows;
            if (group != widened) {
                const Py_ssize_t at = group * heads * d;
                for (Py_ssize_t k = 0; k < heads * d; k++) {
                    uint16_t hs, hz;
                    memcpy(&hs, scale + 2 * (at + k), 2);
                    memcpy(&hz, zero + 2 * (at + k), 2);
                    work[k] = half_value(hs);
                    work[heads * d + k] = half_value(hz);
                }
                widened = group;
            }
            const float *s = work + (r % heads) * d, *z = s + heads * d;
            for (Py_ssize_t j = 0; j < d; j++) y[j] = y[j] * s[j] + z[j];
        } else {
            for (Py_ssize_t q = 0; q < d / g; q++) {
                uint16_t hs, hz;
                memcpy(&hs, scale + 2 * (r * (d / g) + q), 2);
                memcpy(&hz, zero + 2 * (r * (d / g) + q), 2);
                const float s = half_value(hs), z = half_value(hz);
                for (Py_ssize_t j = q * g; j < (q + 1) * g; j++) y[j] = y[j] * s + z;
            }
        }
        if (kind == 1) {
            uint16_t *to = (uint16_t *)out + i * d;
            for (Py_ssize_t j = 0; j < d; j++) to[j] = float_to_bf16(y[j]);
        } else {
            float *to = (float *)out + i * d;
            for (Py_ssize_t j = 0; j < d; j++) to[j] = y[j] == y[j] ? y[j] : canonical_nan;
        }
    }
}

/* int4_dequantize(codes, scale, zero, heads, d, g, key_rows, out, kind, spans=None): an
 * int4 chunk of N rows (``heads`` a token, ``d`` values each) decoded: ``codes`` uint8
 * [N, d / 2], ``scale`` and ``zero`` fp16 bytes, [ceil(T / key_rows), heads, d] for keys
 * (key_rows > 0) or [N, d / g] for values (key_rows 0); ``out`` fp32 (kind 0) or bf16 bits
 * (kind 1) [N, d], or with ``spans`` (an iov array taking exactly the decoded rows) a work
 * buffer of at least a row, written a piece at a time and copied out as fp8_dequantize's. */
static PyObject *py_int4_dequantize(PyObject *self, PyObject *args) {
    PyObject *objs[4], *spans_obj = Py_None;
    Py_ssize_t heads, d, g, key_rows;
    int kind;
    if (!PyArg_ParseTuple(args, "OOOnnnnOi|O", &objs[0], &objs[1], &objs[2], &heads, &d, &g, &key_rows, &objs[3],
                          &kind, &spans_obj))
        return NULL;
    OutSpans spans;
    Py_buffer held[4];
    if (decoder_args(objs, spans_obj, held, &spans) < 0) return NULL;
    PyObject *result = NULL;
    if (kind_and_d("int4_dequantize", kind, d) < 0) goto done;
    const Py_ssize_t item = kind == 1 ? 2 : 4, n = d % 2 ? 0 : held[0].len / (d / 2);
    const size_t total = spans.total;
    const int spilled = spans.given;
    int ok = d % 2 == 0 && heads > 0 && heads <= PY_SSIZE_T_MAX / d && key_rows >= 0 && n * (d / 2) == held[0].len &&
             n % heads == 0;
    if (ok) {
        const Py_ssize_t tokens = n / heads; /* groups: at most the values, n d, so no product wraps */
        const Py_ssize_t groups = key_rows ? (tokens / key_rows + (tokens % key_rows != 0)) * heads * d
                                           : (g > 0 && d % g == 0 ? n * (d / g) : -1);
        ok = groups >= 0 && held[1].len == groups * 2 && held[2].len == groups * 2 &&
             (spilled ? held[3].len >= d * item && total == (size_t)(n * d * item) : held[3].len == n * d * item);
    }
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "int4_dequantize: codes uint8 [N, d / 2] with N a multiple of heads, scale and "
                     "zero fp16 [ceil(N / heads / key_rows), heads, d] (keys) or [N, d / g] (values, key_rows 0), out "
                     "fp32 (kind 0) or bf16 bits (kind 1) [N, d] (with spans: at least a row, the spans taking [N, d]);"
                     " got %zd code bytes, heads %zd, d %zd, g %zd, key_rows %zd, %zd scale bytes, %zd zero bytes, %zd "
                     "out bytes, kind %d, %zu span bytes", held[0].len, heads, d, g, key_rows, held[1].len,
                     held[2].len, held[3].len, kind, total);
        goto done;
    }
    if (n == 0) { /* nothing to decode; ``heads`` is then bounded by nothing, so allocate nothing */
        result = Py_NewRef(Py_None);
        goto done;
    }
    float *sz = PyMem_Malloc((2 * (size_t)heads + 1) * (size_t)d * sizeof(float)); /* int4_decode_rows' work */
    if (sz == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (!spilled) {
        int4_decode_rows(held[0].buf, held[1].buf, held[2].buf, 0, n, heads, d, g, key_rows, sz, held[3].buf, kind);
    } else { /* a piece of rows at a time in ``out``, in cache, then out to the spans */
        const Py_ssize_t room = held[3].len / (d * item);
        SpanCursor at = {spans.iov, 0, 0};
        for (Py_ssize_t r = 0; r < n; r += room) {
            const Py_ssize_t rows = n - r < room ? n - r : room;
            int4_decode_rows(held[0].buf, held[1].buf, held[2].buf, r, rows, heads, d, g, key_rows, sz, held[3].buf,
                             kind);
            spill(&at, held[3].buf, (size_t)(rows * d * item));
        }
        store_fence();
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(sz);
    result = Py_NewRef(Py_None);
done:
    out_spans_release(&spans);
    release_buffers(held, 4);
    return result;
}

static PyMethodDef methods[] = {
    {"rot_stats", py_rot_stats, METH_VARARGS, "rot_stats(x, kind, d, e, mn, mx): rotated rows' exponents and ranges."},
    {"rot_quantize", py_rot_quantize, METH_VARARGS, "rot_quantize(x, kind, d, mode, inv, z, out): rotated rows' codes."},
    {"rot_encode_spans", py_rot_encode_spans, METH_VARARGS,
     "rot_encode_spans(iov, kind, d, mode, params, codes): int8h or int4h rows read where they lie, in one pass."},
    {"fp8_quantize", py_fp8_quantize, METH_VARARGS, "fp8_quantize(x, kind, d, scale, codes): fp8 rows encoded."},
    {"fp8_quantize_spans", py_fp8_quantize_spans, METH_VARARGS,
     "fp8_quantize_spans(iov, kind, d, scale, codes): fp8 rows encoded where they lie."},
    {"int4_quantize", py_int4_quantize, METH_VARARGS,
     "int4_quantize(x, kind, g, scale, zero, codes): int4 value groups encoded."},
    {"int4_quantize_spans", py_int4_quantize_spans, METH_VARARGS,
     "int4_quantize_spans(iov, kind, g, scale, zero, codes): int4 value groups encoded where they lie."},
    {"int4_key_quantize_spans", py_int4_key_quantize_spans, METH_VARARGS,
     "int4_key_quantize_spans(iov, kind, C, rows, scale, zero, codes): int4 key groups encoded where they lie."},
    {"int4_dequantize", py_int4_dequantize, METH_VARARGS,
     "int4_dequantize(codes, scale, zero, heads, d, g, key_rows, out, kind, spans=None): int4 rows decoded."},
    {"fp8_dequantize", py_fp8_dequantize, METH_VARARGS,
     "fp8_dequantize(codes, d, scale, table, out, kind, spans=None): fp8 rows decoded (into spans: see the source)."},
    {"rot_dequantize", py_rot_dequantize, METH_VARARGS,
     "rot_dequantize(codes, mode, d, scale, zero, out, kind, spans=None): rotated rows decoded (see the source)."},
    {"bit_planes", py_bit_planes, METH_VARARGS, "bit_planes(codes, n, bits, planes, encoding): codes <-> bit planes."},
    {"key_extremes", py_key_extremes, METH_VARARGS, "key_extremes(x, kind, C, gmn, gmx, mn, mx): int4a key groups' ranges."},
    {"key_grid", py_key_grid, METH_VARARGS, "key_grid(lo, hi, heads, bounds, glo, scale, bits[, gmn, gmx]): int4a's grid."},
    {"key_encode", py_key_encode, METH_VARARGS, "key_encode(x, glo, inv, bits, out): int4a coded key groups."},
    {"key_decode", py_key_decode, METH_VARARGS,
     "key_decode(words, bits, scale, glo, out, kind=0, spans=None): key_encode undone."},
    {"rot_encode4a", py_rot_encode4a, METH_VARARGS,
     "rot_encode4a(x, kind, d, heads, log_block, base, code, zeros, codes): int4a compact value rows coded."},
    {"row_steps4a", py_row_steps4a, METH_VARARGS, "row_steps4a(code, base, zeros, scale, z): rot_encode4a's scales undone."},
    {"crc32c", py_crc32c, METH_VARARGS, "crc32c(iov, crc=0) -> CRC32C of the spans' concatenation."},
    {"crc32c_together", py_crc32c_together, METH_VARARGS,
     "crc32c_together(iovs) -> the CRC32C of each span list, their rows read once (see the source)."},
    {"sendv", py_sendv, METH_VARARGS, "sendv(fd, iov, timeout=-1) -> bytes written (all of them)."},
    {"recvv", py_recvv, METH_VARARGS, "recvv(fd, iov, timeout=-1) -> bytes read (fewer only at end of stream)."},
    {"crc32c_buffer", py_crc32c_buffer, METH_VARARGS,
     "crc32c_buffer(buffer, crc=0) -> CRC32C of a C-contiguous buffer, continuing crc."},
    {"copy_out", py_copy_out, METH_VARARGS,
     "copy_out(buffer, iov) -> bytes copied: the buffer to the spans, with stores that bypass the cache."},
    {"hardware", py_hardware, METH_NOARGS, "hardware() -> whether CRC32C runs on the CPU's instruction."},
    {"rows", py_rows, METH_VARARGS, "rows(out, ids, address, ...) -> spans written into out (see the source)."},
    {"lane_recv", py_lane_recv, METH_VARARGS,
     "lane_recv(fd, head, lanes, lock, batch, max_payload, checked, counters, stream=None, conn=None, bounce=None) "
     "-> (status, lane, received, owed, error): the receive lane (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scatter", NULL, -1, methods};

PyMODINIT_FUNC PyInit__scatter(void) {
    init_byte_table();
#if HAVE_X86
    init_x2n();
    __builtin_cpu_init();
    use_hw = __builtin_cpu_supports("sse4.2");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "TOGETHER_MAX", TOGETHER_MAX) < 0 ||
                      PyModule_AddIntConstant(m, "STREAMING_STORES", HAVE_X86) < 0 ||
                      PyModule_AddIntConstant(m, "LANE_PYTHON", LANE_PYTHON) < 0 ||
                      PyModule_AddIntConstant(m, "LANE_HANDOFF", LANE_HANDOFF) < 0 ||
                      PyModule_AddIntConstant(m, "LANE_CHECKSUM", LANE_CHECKSUM) < 0 ||
                      PyModule_AddIntConstant(m, "LANE_LOST", LANE_LOST) < 0 ||
                      PyModule_AddIntConstant(m, "LANE_CREDIT", LANE_CREDIT) < 0 ||
                      PyModule_AddIntConstant(m, "LANE_FAILED", LANE_FAILED) < 0 ||
                      PyModule_AddIntConstant(m, "LANE_HEAD", LANE_HEAD) < 0 ||
                      PyModule_AddIntConstant(m, "LANE_FIELDS", LANE_FIELDS) < 0))
        Py_CLEAR(m);
    return m;
}
