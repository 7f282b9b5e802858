/* kvwire C ABI: stream an LLM's KV cache from a prefill process to a decode process.
 *
 * This header is the single source of truth of the ABI: libkvwire.so is generated from
 * it (bindings/build_capi.py). Plain C; no includes, so 64-bit integers are `long long`.
 * The guide is docs/c-api.md.
 *
 * Conventions
 *   - Every function that can fail returns an int status: KVW_OK (0) or a KVW_ERR_* code.
 *     A failed call changes nothing: it creates, registers, sends and writes nothing
 *     (output pointers included). The message of the last failed call on the calling
 *     thread is kvw_last_error(); a successful call clears it.
 *   - Objects are opaque handles. Closing or freeing one invalidates it: later calls with
 *     it return KVW_ERR_CLOSED, never crash. NULL handles return KVW_ERR_INVALID.
 *   - Call kvw_init() once before anything else: it starts the embedded Python runtime and
 *     imports kvwire and torch, which takes seconds. Every other call is fast after it.
 *     kvw_version*, kvw_strerror, kvw_last_error and the logging calls work before it.
 *   - Any thread may call any function; calls are serialised by the embedded runtime's
 *     lock only for their bookkeeping: data moves in background threads that do not hold it.
 *   - Strings are NUL-terminated UTF-8 and are copied: the caller keeps ownership.
 *   - Times are seconds as double, finite, at most 1e9. A deadline must be > 0. A timeout
 *     < 0 means "until the transfer's deadline"; NaN, infinity and larger values are refused
 *     (KVW_ERR_INVALID). A transfer needs at least 1 token (an expect of 0 tokens declines).
 *   - No shutdown call is needed: close senders and receivers (their connections close),
 *     then exit. Do not fork after kvw_init() (the child may only exec).
 *
 * ABI rule (semantic versioning of this header and libkvwire.so.MAJOR)
 *   - A program built against version MAJOR.MINOR runs with any library MAJOR.M, M >= MINOR.
 *   - A minor release may add functions, status codes, enum values, log levels, option
 *     keys and statistics keys, and may grow kvw_layout and kvw_tensor at their end.
 *     Nothing is removed, reordered or given another meaning before the next major
 *     version. Treat a status code you do not know as an error.
 *   - Set struct_size to sizeof() of the struct as your program sees it: a library reads
 *     only the fields your version of the header has. A struct_size the library does not
 *     know (0, garbage, or a newer header than the library) is KVW_ERR_INVALID.
 */
#ifndef KVWIRE_H
#define KVWIRE_H

/* The version of this header; kvw_version_number() is the library's. */
#define KVW_VERSION_MAJOR 1
#define KVW_VERSION_MINOR 1
#define KVW_VERSION_PATCH 0
#define KVW_VERSION_NUMBER (KVW_VERSION_MAJOR * 10000 + KVW_VERSION_MINOR * 100 + KVW_VERSION_PATCH)

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. kvw_strerror() names each. */
enum kvw_status {
  KVW_OK = 0,
  KVW_ERR_INVALID = 1,    /* a bad argument: NULL, wrong size, out of range, unknown option */
  KVW_ERR_TIMEOUT = 2,    /* the deadline or timeout passed */
  KVW_ERR_PEER_LOST = 3,  /* the peer is unreachable or went away */
  KVW_ERR_AUTH = 4,       /* authentication failed (wrong shared secret) */
  KVW_ERR_PROTOCOL = 5,   /* the peer broke the protocol */
  KVW_ERR_LAYOUT = 6,     /* the peers disagree on the KV layout or codec */
  KVW_ERR_CANCELLED = 7,  /* cancelled by this side or the peer */
  KVW_ERR_TRANSFER = 8,   /* the transfer failed for another reason (see kvw_last_error) */
  KVW_ERR_CLOSED = 9,     /* the handle was closed or freed */
  KVW_ERR_INIT = 10,      /* the embedded runtime could not start, or kvw_init was not called */
  KVW_ERR_INTERNAL = 11,  /* a bug in kvwire: please report kvw_last_error() */
  KVW_ERR_SYSTEM = 12,    /* the system refused: address in use, no such device, out of memory */
  KVW_PENDING = 13,       /* not an error: the poll calls' "still in flight" */
  KVW_ERR_CHECKSUM = 14   /* (1.1) payloads kept failing their checksum: the path corrupts data */
};

/* Element types of a KV cache. */
enum kvw_dtype { KVW_BF16 = 0, KVW_FP16 = 1, KVW_FP32 = 2 };

/* Levels of the library's log messages (kvw_set_log_level, kvw_log_fn). */
enum kvw_log_level {
  KVW_LOG_DEBUG = 10,
  KVW_LOG_INFO = 20,
  KVW_LOG_WARNING = 30, /* the default: warnings and errors, on standard error */
  KVW_LOG_ERROR = 40,
  KVW_LOG_OFF = 100     /* kvw_set_log_level only: nothing */
};

/* The shape of a model's KV cache; both peers must use the same.
 * GQA/MHA: every layer has k and v tensors of [num_blocks, block_size, num_kv_heads, head_dim].
 * MLA (num_kv_heads == 0): every layer has one kv tensor of [num_blocks, block_size, head_dim].
 *   kvw_layout layout = {sizeof(kvw_layout), 32, 8, 128, 16, KVW_BF16}; */
typedef struct kvw_layout {
  int struct_size; /* sizeof(kvw_layout) */
  int num_layers;
  int num_kv_heads;
  int head_dim;
  int block_size;
  int dtype; /* enum kvw_dtype */
} kvw_layout;

/* One paged cache tensor: its memory, and strides in elements for each logical dimension
 * [block, token-in-block, head, dim] (for MLA, strides[2] is ignored). device: -1 for host
 * memory, else the CUDA device index of a device pointer. In an array, every element has
 * the same struct_size, and the library steps through the array by it. */
typedef struct kvw_tensor {
  int struct_size; /* sizeof(kvw_tensor) */
  void* data;
  long long num_blocks;
  long long strides[4];
  int device;
} kvw_tensor;

typedef struct kvw_sender kvw_sender;
typedef struct kvw_receiver kvw_receiver;
typedef struct kvw_transfer kvw_transfer;
typedef struct kvw_request kvw_request;

/* A log message: level (enum kvw_log_level), the text (valid during the call only), and
 * the user_data given to kvw_set_log_callback. Called from the library's threads, one call
 * at a time, and also from the caller's own thread inside a kvwire call that logs (a
 * warning at kvw_sender_create): do not hold a lock the callback takes around kvwire calls.
 * It must return quickly, and may call kvw_version, kvw_strerror and kvw_last_error but no
 * other kvwire function. */
typedef void (*kvw_log_fn)(int level, const char* message, void* user_data);

/* Library */
int kvw_init(void);
const char* kvw_version(void); /* "MAJOR.MINOR.PATCH" of the library */
int kvw_version_number(void);  /* KVW_VERSION_NUMBER of the library */
const char* kvw_strerror(int status);
/* The last failure's message on this thread ("" after a success); valid until this
 * thread's next call of kvw_last_error. */
const char* kvw_last_error(void);
/* Deliver log messages to callback instead of standard error (NULL: back to standard
 * error). When it returns, the previous callback is not running and will not be called. */
int kvw_set_log_callback(kvw_log_fn callback, void* user_data);
/* Deliver messages of `level` and above (enum kvw_log_level; KVW_LOG_OFF: none). */
int kvw_set_log_level(int level);

/* Sender: connects to the receiver and authenticates before it returns (it blocks up to
 * connect_timeout per connection). peer: "host:port". secret: non-NULL, at least 8 bytes,
 * the same on both sides. caches: num_layers * 2 tensors (k, v of layer 0, then layer 1,
 * ...) or num_layers tensors for MLA. options: comma-separated key=value (docs/c-api.md
 * has the grammar), NULL or "" for the defaults:
 *   streams=4, codec=raw|fp8|int4|raw+lz4|fp8+lz4|int4+lz4 (or a descriptor such as
 *   int4/g64/k64), chunk_kib=2048 (4096 on a short path unless set), staging_mib=64, connect_timeout=10,
 *   transport=tcp|ucx (ucx needs UCXX in the embedded Python),
 *   exact_tokens=0 (a lossy codec sends the first N tokens of each transfer raw) */
int kvw_sender_create(const kvw_layout* layout, const char* peer, const char* secret, const kvw_tensor* caches,
                      int num_caches, const char* options, kvw_sender** out);
/* Statistics as JSON (schema: docs/c-api.md). Writes the text and its NUL if they fit in
 * buf_len bytes; *needed (if not NULL) is set to the size they need either way. buf NULL
 * with buf_len 0 only asks for the size (KVW_OK); a buffer too small is KVW_ERR_INVALID
 * and is left untouched. The size varies between calls: leave room, or retry. */
int kvw_sender_stats_json(kvw_sender* sender, char* buf, long long buf_len, long long* needed);
/* Close the connections; transfers still open fail with KVW_ERR_CANCELLED (their handles
 * stay valid until freed). */
int kvw_sender_close(kvw_sender* sender);

/* A transfer of num_tokens tokens held in block_ids (token order) that must end within
 * deadline_s seconds from now. */
int kvw_transfer_begin(kvw_sender* sender, const char* request_id, const int* block_ids, int num_blocks,
                       int num_tokens, double deadline_s, kvw_transfer** out);
/* Queue layer `layer`; returns at once. cuda_stream: the stream the layer was computed on
 * (kvwire reads the cache after the work queued there), or NULL for host caches. Once the
 * transfer has failed, the layer is dropped (KVW_OK): kvw_transfer_finish returns why. */
int kvw_transfer_send_layer(kvw_transfer* transfer, int layer, void* cuda_stream);
/* Wait up to timeout_s for the receiver's acknowledgement. If the timeout passes first,
 * the transfer is cancelled (KVW_ERR_TIMEOUT); to wait without cancelling, poll. */
int kvw_transfer_finish(kvw_transfer* transfer, double timeout_s);
/* Non-blocking: KVW_OK once the receiver acknowledged every layer, KVW_PENDING while the
 * transfer is in flight, else the status of its failure (as kvw_transfer_finish). Never
 * cancels; once the deadline has passed, the transfer has failed: the poll that sees it
 * ends it (the receiver is told) and returns KVW_ERR_TIMEOUT. */
int kvw_transfer_poll(kvw_transfer* transfer);
int kvw_transfer_cancel(kvw_transfer* transfer);
/* Free the handle; a transfer that has not ended is cancelled. */
int kvw_transfer_free(kvw_transfer* transfer);

/* Receiver. listen: "host:port" (port 0 picks one, see kvw_receiver_port). secret and
 * caches as for the sender. options:
 *   staging_mib=256, slot_kib=4160, window_mib=0 (auto), codecs=fp8|int4 (accepted),
 *   unclaimed_timeout=60, transport=tcp|ucx */
int kvw_receiver_create(const kvw_layout* layout, const char* listen, const char* secret, const kvw_tensor* caches,
                        int num_caches, const char* options, kvw_receiver** out);
int kvw_receiver_port(kvw_receiver* receiver, int* port);
int kvw_receiver_stats_json(kvw_receiver* receiver, char* buf, long long buf_len, long long* needed);
/* Stop listening and close every connection; open requests fail with KVW_ERR_CANCELLED. */
int kvw_receiver_close(kvw_receiver* receiver);

/* Name where a request lands: num_tokens tokens into block_ids (token order; the last
 * block may be partial), complete within deadline_s seconds from now. Data that arrived
 * earlier is placed now. */
int kvw_expect(kvw_receiver* receiver, const char* request_id, const int* block_ids, int num_blocks, int num_tokens,
               double deadline_s, kvw_request** out);
int kvw_request_wait_layer(kvw_request* request, int layer, double timeout_s);
/* Wait up to timeout_s for every layer; a timeout does not cancel the request. */
int kvw_request_wait(kvw_request* request, double timeout_s);
/* Non-blocking: KVW_OK once every layer is in place, KVW_PENDING while it is not, else
 * the status of the failure (KVW_ERR_TIMEOUT once the deadline has passed). Never cancels. */
int kvw_request_poll(kvw_request* request);
int kvw_request_cancel(kvw_request* request);
/* Free the handle; a request that has not ended is cancelled. */
int kvw_request_free(kvw_request* request);

#ifdef __cplusplus
}
#endif

#endif /* KVWIRE_H */
