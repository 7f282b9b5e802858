/* kvwire C ABI: stream an LLM's KV cache from a prefill process to a decode process.
 *
 * This header is the single source of truth of the ABI: libkvwire.so is generated from
 * it (bindings/build_capi.py). Plain C; no includes, so 64-bit integers are `long long`.
 *
 * Conventions
 *   - Every function that can fail returns an int status: KVW_OK (0) or a KVW_ERR_* code.
 *     The message of the last failure on the calling thread is kvw_last_error().
 *   - Objects are opaque handles. Closing or freeing one invalidates it: later calls with
 *     it return KVW_ERR_CLOSED, never crash. NULL handles return KVW_ERR_INVALID.
 *   - Call kvw_init() once before anything else: it starts the embedded Python runtime and
 *     imports kvwire and torch, which takes seconds. Every other call is fast after it.
 *   - Any thread may call any function; calls are serialised by the embedded runtime's
 *     lock only for their bookkeeping: data moves in background threads that do not hold it.
 *   - Times are seconds as double; a negative timeout means "until the transfer's deadline".
 */
#ifndef KVWIRE_H
#define KVWIRE_H

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. */
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
  KVW_ERR_INTERNAL = 11   /* a bug in kvwire: please report kvw_last_error() */
};

/* Element types of a KV cache. */
enum kvw_dtype { KVW_BF16 = 0, KVW_FP16 = 1, KVW_FP32 = 2 };

/* The shape of a model's KV cache; both peers must use the same.
 * GQA/MHA: every layer has k and v tensors of [num_blocks, block_size, num_kv_heads, head_dim].
 * MLA (num_kv_heads == 0): every layer has one kv tensor of [num_blocks, block_size, head_dim]. */
typedef struct kvw_layout {
  int num_layers;
  int num_kv_heads;
  int head_dim;
  int block_size;
  int dtype; /* enum kvw_dtype */
} kvw_layout;

/* One paged cache tensor: its memory, and strides in elements for each logical dimension
 * [block, token-in-block, head, dim] (for MLA, strides[2] is ignored). device: -1 for host
 * memory, else the CUDA device index of a device pointer. */
typedef struct kvw_tensor {
  void* data;
  long long num_blocks;
  long long strides[4];
  int device;
} kvw_tensor;

typedef struct kvw_sender kvw_sender;
typedef struct kvw_receiver kvw_receiver;
typedef struct kvw_transfer kvw_transfer;
typedef struct kvw_request kvw_request;

/* Library */
int kvw_init(void);
const char* kvw_version(void);
const char* kvw_strerror(int status);
const char* kvw_last_error(void);

/* Sender. caches: num_layers * 2 tensors (k, v of layer 0, then layer 1, ...) or
 * num_layers tensors for MLA. options: comma-separated key=value, may be NULL or "":
 *   streams=4, codec=raw|fp8|int4|raw+lz4|fp8+lz4|int4+lz4 (or a descriptor such as
 *   int4/g64/k64), chunk_kib=2048, staging_mib=64, connect_timeout=10,
 *   transport=tcp|ucx (ucx needs UCXX in the embedded Python),
 *   exact_tokens=0 (a lossy codec sends the first N tokens of each transfer raw) */
int kvw_sender_create(const kvw_layout* layout, const char* peer, const char* secret, const kvw_tensor* caches,
                      int num_caches, const char* options, kvw_sender** out);
int kvw_sender_stats_json(kvw_sender* sender, char* buf, long long buf_len);
int kvw_sender_close(kvw_sender* sender);

/* A transfer of num_tokens tokens held in block_ids (token order). */
int kvw_transfer_begin(kvw_sender* sender, const char* request_id, const int* block_ids, int num_blocks,
                       int num_tokens, double deadline_s, kvw_transfer** out);
/* Queue layer `layer`; returns at once. cuda_stream: the stream the layer was computed on
 * (kvwire reads the cache after the work queued there), or NULL for host caches. */
int kvw_transfer_send_layer(kvw_transfer* transfer, int layer, void* cuda_stream);
/* Wait for the receiver's acknowledgement. */
int kvw_transfer_finish(kvw_transfer* transfer, double timeout_s);
int kvw_transfer_cancel(kvw_transfer* transfer);
int kvw_transfer_free(kvw_transfer* transfer);

/* Receiver. listen: "host:port" (port 0 picks one, see kvw_receiver_port). options:
 *   staging_mib=256, slot_kib=4160, window_mib=0 (auto), codecs=fp8|int4 (accepted), unclaimed_timeout=60,
 *   transport=tcp|ucx */
int kvw_receiver_create(const kvw_layout* layout, const char* listen, const char* secret, const kvw_tensor* caches,
                        int num_caches, const char* options, kvw_receiver** out);
int kvw_receiver_port(kvw_receiver* receiver, int* port);
int kvw_receiver_stats_json(kvw_receiver* receiver, char* buf, long long buf_len);
int kvw_receiver_close(kvw_receiver* receiver);

/* Name where a request lands; data that arrived earlier is placed now. */
int kvw_expect(kvw_receiver* receiver, const char* request_id, const int* block_ids, int num_blocks, int num_tokens,
               double deadline_s, kvw_request** out);
int kvw_request_wait_layer(kvw_request* request, int layer, double timeout_s);
int kvw_request_wait(kvw_request* request, double timeout_s);
int kvw_request_cancel(kvw_request* request);
int kvw_request_free(kvw_request* request);

#ifdef __cplusplus
}
#endif

#endif /* KVWIRE_H */
