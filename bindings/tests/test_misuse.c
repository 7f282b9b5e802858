/* The misuse suite: every way a C caller can get an argument or a handle wrong, and the
 * environment failures a caller meets. Each call must fail with the right status and a
 * message in C terms that names what is wrong, and must change nothing (an output
 * pointer keeps its value, no request is registered, no transfer is left active).
 * ctest builds and runs this under AddressSanitizer and UBSan where the compiler has them. */
#include <math.h>

#include "capi_test.h"

static int cases = 0;
static const void* const SENTINEL = (const void*)0x5e17;

/* Words that would betray Python behind the C ABI, or a machine's folders. */
static const char* const PYTHONISMS[] = {"Error:", "Traceback", "cdata", "torch.", "NoneType", "File \"",
                                         "site-packages", "kv_caches", "b'", "[Errno", "['", NULL};

static void check_message(const char* call, int line, const char* names) {
  const char* message = kvw_last_error();
  if (getenv("KVWIRE_TEST_VERBOSE")) printf("%-100.100s -> %s\n", call, message);
  if (!*message) {
    fprintf(stderr, "FAIL line %d: %s left no message\n", line, call);
    failures++;
    return;
  }
  if (names && !strstr(message, names)) {
    fprintf(stderr, "FAIL line %d: %s: the message should name \"%s\": %s\n", line, call, names, message);
    failures++;
  }
  for (int i = 0; PYTHONISMS[i]; ++i)
    if (strstr(message, PYTHONISMS[i])) {
      fprintf(stderr, "FAIL line %d: %s: the message is not in C terms (\"%s\"): %s\n", line, call, PYTHONISMS[i],
              message);
      failures++;
    }
}

/* call must return want, leave a message naming `names`, and leave *out (if any) alone. */
#define MISUSE(call, want, names)                                                                     \
  do {                                                                                                \
    cases++;                                                                                          \
    int rc_ = (call);                                                                                 \
    CHECK(rc_ == (want), "%s returned %d (%s), expected %d (%s)", #call, rc_, kvw_strerror(rc_), (want), \
          kvw_strerror(want));                                                                        \
    if (rc_ != KVW_OK) check_message(#call, __LINE__, (names));                                       \
  } while (0)

#define UNTOUCHED(out) CHECK((const void*)(out) == SENTINEL, #out " was written by a failed call")

static caches src, dst;
static kvw_receiver* rx;
static char peer[64];

static void library_calls(void) {
  CHECK(strcmp(kvw_strerror(999), "unknown status 999") == 0, "strerror of an unknown status: %s", kvw_strerror(999));
  MISUSE(kvw_set_log_level(5), KVW_ERR_INVALID, "level");
  MISUSE(kvw_set_log_level(-1), KVW_ERR_INVALID, "level");
  /* A success clears the previous failure's message, kvw_init included. */
  EXPECT_STATUS(kvw_init(), KVW_OK);
  CHECK(*kvw_last_error() == 0, "kvw_init succeeded but the last error is still \"%s\"", kvw_last_error());
}

static void layouts(void) {
  kvw_sender* s = (kvw_sender*)SENTINEL;
  kvw_receiver* r = (kvw_receiver*)SENTINEL;
  kvw_layout l;
  MISUSE(kvw_sender_create(NULL, peer, SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "layout");
  MISUSE(kvw_receiver_create(NULL, "127.0.0.1:0", SECRET, dst.tensors, 8, NULL, &r), KVW_ERR_INVALID, "layout");
  l = LAYOUT, l.struct_size = 0;
  MISUSE(kvw_sender_create(&l, peer, SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "layout.struct_size");
  l = LAYOUT, l.struct_size = sizeof(kvw_layout) + 8; /* a newer header than the library */
  MISUSE(kvw_receiver_create(&l, "127.0.0.1:0", SECRET, dst.tensors, 8, NULL, &r), KVW_ERR_INVALID, "struct_size");
  l = LAYOUT, l.num_layers = 0;
  MISUSE(kvw_sender_create(&l, peer, SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "layout.num_layers");
  l = LAYOUT, l.num_layers = 1 << 30;
  MISUSE(kvw_sender_create(&l, peer, SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "layout.num_layers");
  l = LAYOUT, l.num_kv_heads = -2;
  MISUSE(kvw_sender_create(&l, peer, SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "layout.num_kv_heads");
  l = LAYOUT, l.head_dim = 0;
  MISUSE(kvw_receiver_create(&l, "127.0.0.1:0", SECRET, dst.tensors, 8, NULL, &r), KVW_ERR_INVALID, "layout.head_dim");
  l = LAYOUT, l.block_size = -16;
  MISUSE(kvw_sender_create(&l, peer, SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "layout.block_size");
  l = LAYOUT, l.dtype = 7;
  MISUSE(kvw_sender_create(&l, peer, SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "layout.dtype");
  UNTOUCHED(s);
  UNTOUCHED(r);
}

static void cache_tensors(void) {
  kvw_sender* s = (kvw_sender*)SENTINEL;
  kvw_receiver* r = (kvw_receiver*)SENTINEL;
  kvw_tensor t[LAYERS * 2];
  /* NULL caches: a bad argument, on both sides (it was an internal error). */
  MISUSE(kvw_sender_create(&LAYOUT, peer, SECRET, NULL, 8, NULL, &s), KVW_ERR_INVALID, "caches");
  MISUSE(kvw_receiver_create(&LAYOUT, "127.0.0.1:0", SECRET, NULL, 8, NULL, &r), KVW_ERR_INVALID, "caches");
  MISUSE(kvw_sender_create(&LAYOUT, peer, SECRET, src.tensors, 7, NULL, &s), KVW_ERR_INVALID, "num_caches");
  MISUSE(kvw_sender_create(&LAYOUT, peer, SECRET, src.tensors, -1, NULL, &s), KVW_ERR_INVALID, "num_caches");
  MISUSE(kvw_receiver_create(&LAYOUT, "127.0.0.1:0", SECRET, dst.tensors, 0, NULL, &r), KVW_ERR_INVALID, "num_caches");
#define WITH(field_change, want, names)                                                         \
  memcpy(t, src.tensors, sizeof t);                                                             \
  field_change;                                                                                 \
  MISUSE(kvw_sender_create(&LAYOUT, peer, SECRET, t, 8, NULL, &s), (want), (names))
  WITH(t[0].struct_size = 0, KVW_ERR_INVALID, "caches[0].struct_size");
  WITH(t[2].struct_size = 8, KVW_ERR_INVALID, "caches[2].struct_size");
  WITH(t[1].data = NULL, KVW_ERR_INVALID, "caches[1].data");
  WITH(t[0].num_blocks = 0, KVW_ERR_INVALID, "caches[0].num_blocks");
  WITH(t[3].num_blocks = BLOCKS - 1, KVW_ERR_INVALID, "caches[3].num_blocks");
  WITH(t[5].strides[1] = -1, KVW_ERR_INVALID, "caches[5].strides[1]");
  WITH(t[4].strides[0] = 0, KVW_ERR_INVALID, "caches[4].strides[0]");
  WITH(t[0].num_blocks = t[1].num_blocks = 1LL << 50, KVW_ERR_INVALID, "caches[0]");
  WITH(t[2].device = -7, KVW_ERR_INVALID, "caches[2].device");
  /* A device this machine does not have: the environment, not a bug (it was internal). */
  WITH(for (int i = 0; i < 8; ++i) t[i].device = 99, KVW_ERR_SYSTEM, "caches[0].device");
#undef WITH
  UNTOUCHED(s);
  UNTOUCHED(r);
}

static void strings_and_options(void) {
  kvw_sender* s = (kvw_sender*)SENTINEL;
  kvw_receiver* r = (kvw_receiver*)SENTINEL;
  MISUSE(kvw_sender_create(&LAYOUT, NULL, SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "peer");
  MISUSE(kvw_sender_create(&LAYOUT, "localhost", SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "peer");
  MISUSE(kvw_sender_create(&LAYOUT, "127.0.0.1:99999", SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "peer");
  MISUSE(kvw_sender_create(&LAYOUT, "127.0.0.1:0", SECRET, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "peer");
  MISUSE(kvw_receiver_create(&LAYOUT, "127.0.0.1:-1", SECRET, dst.tensors, 8, NULL, &r), KVW_ERR_INVALID, "listen");
  MISUSE(kvw_receiver_create(&LAYOUT, "\xff\xfe:1", SECRET, dst.tensors, 8, NULL, &r), KVW_ERR_INVALID, "UTF-8");
  MISUSE(kvw_sender_create(&LAYOUT, peer, NULL, src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "secret");
  MISUSE(kvw_receiver_create(&LAYOUT, "127.0.0.1:0", "short", dst.tensors, 8, NULL, &r), KVW_ERR_INVALID, "secret");
  MISUSE(kvw_sender_create(&LAYOUT, peer, "", src.tensors, 8, NULL, &s), KVW_ERR_INVALID, "secret");
  static const struct {
    const char* options;
    const char* names;
  } bad_sender[] = {
      {"colour=red", "colour"},
      {"streams=0", "streams"},
      {"streams=65", "streams"},
      {"streams=two", "streams"},
      {"streams=-1", "streams"},
      {"streams=2,,codec=raw", "empty"},
      {"streams=2,", "empty"},
      {",", "empty"},
      {"streams=2,streams=3", "twice"},
      {"codec=", "codec"},
      {"codec", "key=value"},
      {"codec=zip", "zip"},
      {"codec=int4/x9", "int4/x9"},
      {"transport=pigeon", "transport"},
      {"chunk_kib=1", "chunk_kib"},
      {"staging_mib=1,chunk_kib=4096", "staging_mib"},
      {"connect_timeout=nan", "connect_timeout"},
      {"connect_timeout=inf", "connect_timeout"},
      {"connect_timeout=0", "connect_timeout"},
      {"exact_tokens=-16", "exact_tokens"},
      {"Streams=2", "Streams"},
  };
  for (size_t i = 0; i < sizeof bad_sender / sizeof bad_sender[0]; ++i)
    MISUSE(kvw_sender_create(&LAYOUT, peer, SECRET, src.tensors, 8, bad_sender[i].options, &s), KVW_ERR_INVALID,
           bad_sender[i].names);
  static const struct {
    const char* options;
    const char* names;
  } bad_receiver[] = {
      {"streams=2", "streams"}, /* a sender's option */
      {"window_mib=1", "window_mib"},
      {"staging_mib=1,slot_kib=4160", "staging_mib"},
      {"codecs=fp8|zip", "zip"},
      {"codecs=", "codecs"},
      {"unclaimed_timeout=-1", "unclaimed_timeout"},
      {"slot_kib=0", "slot_kib"},
  };
  for (size_t i = 0; i < sizeof bad_receiver / sizeof bad_receiver[0]; ++i)
    MISUSE(kvw_receiver_create(&LAYOUT, "127.0.0.1:0", SECRET, dst.tensors, 8, bad_receiver[i].options, &r),
           KVW_ERR_INVALID, bad_receiver[i].names);
  UNTOUCHED(s);
  UNTOUCHED(r);
  /* Spaces around items, keys and values are allowed. */
  kvw_sender* ok = NULL;
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, peer, SECRET, src.tensors, 8, " streams = 2 , codec = raw ", &ok), KVW_OK);
  if (ok) EXPECT_STATUS(kvw_sender_close(ok), KVW_OK);
}

static void environment(void) {
  kvw_sender* s = (kvw_sender*)SENTINEL;
  kvw_receiver* r = (kvw_receiver*)SENTINEL;
  /* A port in use: the system refuses, and says so without a traceback (it was internal). */
  char listen[64];
  snprintf(listen, sizeof listen, "%s", peer);
  MISUSE(kvw_receiver_create(&LAYOUT, listen, SECRET, dst.tensors, 8, NULL, &r), KVW_ERR_SYSTEM, "in use");
  CHECK(strstr(kvw_last_error(), "listen") != NULL, "the message should say it is about listen: %s", kvw_last_error());
  /* Nobody listens there (the port of a receiver that was closed). */
  kvw_receiver* gone = NULL;
  char gone_peer[64];
  gone = loopback_receiver(&dst, NULL, gone_peer, sizeof gone_peer);
  EXPECT_STATUS(kvw_receiver_close(gone), KVW_OK);
  MISUSE(kvw_sender_create(&LAYOUT, gone_peer, SECRET, src.tensors, 8, "connect_timeout=5", &s), KVW_ERR_PEER_LOST,
         NULL);
  MISUSE(kvw_sender_create(&LAYOUT, peer, "not-the-secret", src.tensors, 8, NULL, &s), KVW_ERR_AUTH, "secret");
  MISUSE(kvw_sender_create(&LAYOUT, "no-such-host.invalid:7400", SECRET, src.tensors, 8, NULL, &s), KVW_ERR_PEER_LOST,
         "no-such-host.invalid");
  MISUSE(kvw_receiver_create(&LAYOUT, "203.0.113.77:0", SECRET, dst.tensors, 8, NULL, &r), KVW_ERR_SYSTEM,
         "EADDRNOTAVAIL"); /* an address (TEST-NET-3) this machine does not have */
  UNTOUCHED(s);
  UNTOUCHED(r);
}

/* The peers disagree on the layout: the message names the field that differs. */
static void layout_mismatches(void) {
  kvw_sender* s = (kvw_sender*)SENTINEL;
  kvw_layout l = LAYOUT;
  kvw_tensor t[LAYERS * 2];
  memcpy(t, src.tensors, sizeof t);
  l.num_layers = LAYERS - 1;
  MISUSE(kvw_sender_create(&l, peer, SECRET, t, (LAYERS - 1) * 2, NULL, &s), KVW_ERR_LAYOUT, "num_layers");
  l = LAYOUT, l.dtype = KVW_BF16;
  MISUSE(kvw_sender_create(&l, peer, SECRET, t, 8, NULL, &s), KVW_ERR_LAYOUT, "dtype is KVW_BF16 here, KVW_FP32");
  l = LAYOUT, l.num_kv_heads = HEADS * 2, l.head_dim = DIM / 2;
  for (int i = 0; i < 8; ++i) t[i].strides[2] = DIM / 2;
  MISUSE(kvw_sender_create(&l, peer, SECRET, t, 8, NULL, &s), KVW_ERR_LAYOUT,
         "num_kv_heads is 4 here, 2 on the receiver; head_dim is 32 here, 64");
  memcpy(t, src.tensors, sizeof t);
  /* A different block size is no mismatch: the receiver places tokens in its own blocks. */
  l = LAYOUT, l.block_size = BS / 2;
  for (int i = 0; i < 8; ++i) t[i].num_blocks = BLOCKS * 2, t[i].strides[0] = BS / 2 * HEADS * DIM;
  kvw_sender* halves = NULL;
  EXPECT_STATUS(kvw_sender_create(&l, peer, SECRET, t, 8, NULL, &halves), KVW_OK);
  EXPECT_STATUS(kvw_sender_close(halves), KVW_OK);
  memcpy(t, src.tensors, sizeof t);
  l = LAYOUT, l.num_kv_heads = 0, l.head_dim = HEADS * DIM; /* MLA against GQA */
  kvw_tensor mla[LAYERS];
  for (int i = 0; i < LAYERS; ++i) mla[i] = t[i], mla[i].strides[1] = HEADS * DIM, mla[i].strides[2] = 0;
  MISUSE(kvw_sender_create(&l, peer, SECRET, mla, LAYERS, NULL, &s), KVW_ERR_LAYOUT, "num_kv_heads is 0 (MLA latent) here, 2 on the receiver");
  UNTOUCHED(s);
  /* A codec the receiver does not accept. */
  char picky_peer[64];
  kvw_receiver* picky = loopback_receiver(&dst, "codecs=fp8", picky_peer, sizeof picky_peer);
  MISUSE(kvw_sender_create(&LAYOUT, picky_peer, SECRET, src.tensors, 8, "codec=int4", &s), KVW_ERR_LAYOUT, "int4");
  UNTOUCHED(s);
  EXPECT_STATUS(kvw_receiver_close(picky), KVW_OK);
}

static void transfers(kvw_sender* s) {
  kvw_transfer* t = (kvw_transfer*)SENTINEL;
  kvw_request* q = (kvw_request*)SENTINEL;
  /* out == NULL registers nothing: the same id can be expected and begun afterwards. */
  MISUSE(kvw_expect(rx, "once", (int[]){8, 9}, 2, 20, 30.0, NULL), KVW_ERR_INVALID, "out");
  MISUSE(kvw_transfer_begin(s, "once", (int[]){0, 1}, 2, 20, 30.0, NULL), KVW_ERR_INVALID, "out");
  CHECK(sender_stat(s, "active_transfers") == 0, "a failed kvw_transfer_begin left an active transfer");
  CHECK(receiver_stat(rx, "pending_expect") == 0, "a failed kvw_expect registered the request");
  kvw_request* once = NULL;
  kvw_transfer* once_t = NULL;
  EXPECT_STATUS(kvw_expect(rx, "once", (int[]){8, 9}, 2, 20, 30.0, &once), KVW_OK);
  EXPECT_STATUS(kvw_transfer_begin(s, "once", (int[]){0, 1}, 2, 20, 30.0, &once_t), KVW_OK);
  for (int layer = 0; layer < LAYERS; ++layer) EXPECT_STATUS(kvw_transfer_send_layer(once_t, layer, NULL), KVW_OK);
  EXPECT_STATUS(kvw_transfer_finish(once_t, 30.0), KVW_OK);
  EXPECT_STATUS(kvw_request_wait(once, 30.0), KVW_OK);
  CHECK(same_tokens(&src, (int[]){0, 1}, &dst, (int[]){8, 9}, 20), "the destination differs");

  MISUSE(kvw_transfer_begin(NULL, "x", (int[]){0}, 1, 4, 1.0, &t), KVW_ERR_INVALID, "sender");
  MISUSE(kvw_transfer_begin(s, NULL, (int[]){0}, 1, 4, 1.0, &t), KVW_ERR_INVALID, "request_id");
  MISUSE(kvw_transfer_begin(s, "", (int[]){0}, 1, 4, 1.0, &t), KVW_ERR_INVALID, "request_id");
  MISUSE(kvw_transfer_begin(s, "x", NULL, 2, 20, 1.0, &t), KVW_ERR_INVALID, "block_ids");
  MISUSE(kvw_transfer_begin(s, "x", (int[]){0}, -1, 4, 1.0, &t), KVW_ERR_INVALID, "num_blocks");
  MISUSE(kvw_transfer_begin(s, "x", (int[]){BLOCKS}, 1, 4, 1.0, &t), KVW_ERR_INVALID, "block_ids[0]");
  MISUSE(kvw_transfer_begin(s, "x", (int[]){-1}, 1, 4, 1.0, &t), KVW_ERR_INVALID, "block_ids[0]");
  MISUSE(kvw_transfer_begin(s, "x", (int[]){3, 3}, 2, 20, 1.0, &t), KVW_ERR_INVALID, "block_ids");
  MISUSE(kvw_transfer_begin(s, "x", (int[]){0}, 1, BS + 1, 1.0, &t), KVW_ERR_INVALID, "num_tokens");
  MISUSE(kvw_transfer_begin(s, "x", (int[]){0}, 1, -4, 1.0, &t), KVW_ERR_INVALID, "num_tokens");
  MISUSE(kvw_transfer_begin(s, "x", (int[]){0}, 1, 4, 0.0, &t), KVW_ERR_INVALID, "deadline_s");
  MISUSE(kvw_transfer_begin(s, "x", (int[]){0}, 1, 4, -1.0, &t), KVW_ERR_INVALID, "deadline_s");
  MISUSE(kvw_transfer_begin(s, "x", (int[]){0}, 1, 4, NAN, &t), KVW_ERR_INVALID, "deadline_s");
  MISUSE(kvw_transfer_begin((kvw_sender*)rx, "x", (int[]){0}, 1, 4, 1.0, &t), KVW_ERR_CLOSED, "kvw_sender");
  MISUSE(kvw_transfer_begin((kvw_sender*)0x1234, "x", (int[]){0}, 1, 4, 1.0, &t), KVW_ERR_CLOSED, "kvw_sender");
  MISUSE(kvw_expect(rx, "x", (int[]){BLOCKS}, 1, 4, 1.0, &q), KVW_ERR_INVALID, "block_ids[0]");
  MISUSE(kvw_expect(rx, "x", (int[]){0}, 1, 4, 0.0, &q), KVW_ERR_INVALID, "deadline_s");
  MISUSE(kvw_expect(rx, "\xc3\x28", (int[]){0}, 1, 4, 1.0, &q), KVW_ERR_INVALID, "request_id");
  MISUSE(kvw_expect(NULL, "x", (int[]){0}, 1, 4, 1.0, &q), KVW_ERR_INVALID, "receiver");
  UNTOUCHED(t);
  UNTOUCHED(q);
  CHECK(sender_stat(s, "active_transfers") == 0, "failed begins left an active transfer");
  CHECK(receiver_stat(rx, "pending_expect") == 0, "failed expects registered a request");

  /* Layers, finishing, polling and freeing done wrong. */
  kvw_transfer* u = NULL;
  kvw_request* uq = NULL;
  EXPECT_STATUS(kvw_expect(rx, "twice", (int[]){20}, 1, 4, 30.0, &uq), KVW_OK);
  MISUSE(kvw_expect(rx, "twice", (int[]){21}, 1, 4, 30.0, &q), KVW_ERR_INVALID, "already expected");
  EXPECT_STATUS(kvw_transfer_begin(s, "twice", (int[]){2}, 1, 4, 30.0, &u), KVW_OK);
  MISUSE(kvw_transfer_send_layer(u, -1, NULL), KVW_ERR_INVALID, "layer");
  MISUSE(kvw_transfer_send_layer(u, LAYERS, NULL), KVW_ERR_INVALID, "layer");
  EXPECT_STATUS(kvw_transfer_send_layer(u, 0, NULL), KVW_OK);
  MISUSE(kvw_transfer_send_layer(u, 0, NULL), KVW_ERR_INVALID, "layer");
  MISUSE(kvw_transfer_finish(u, 1.0), KVW_ERR_INVALID, "never sent");
  MISUSE(kvw_transfer_send_layer(u, 1, (void*)0x7), KVW_ERR_INVALID, "cuda_stream"); /* host caches */
  MISUSE(kvw_transfer_finish(u, NAN), KVW_ERR_INVALID, "timeout_s");
  MISUSE(kvw_request_wait(uq, NAN), KVW_ERR_INVALID, "timeout_s");
  MISUSE(kvw_request_wait_layer(uq, LAYERS, 1.0), KVW_ERR_INVALID, "layer");
  MISUSE(kvw_transfer_poll(NULL), KVW_ERR_INVALID, "transfer");
  MISUSE(kvw_request_poll(NULL), KVW_ERR_INVALID, "request");
  EXPECT_STATUS(kvw_transfer_poll(u), KVW_PENDING);
  CHECK(*kvw_last_error() == 0, "KVW_PENDING is not a failure, yet the message is \"%s\"", kvw_last_error());
  EXPECT_STATUS(kvw_transfer_cancel(u), KVW_OK);
  MISUSE(kvw_transfer_send_layer(u, 1, NULL), KVW_ERR_INVALID, "ended");
  MISUSE(kvw_transfer_poll(u), KVW_ERR_CANCELLED, "twice");
  MISUSE(kvw_transfer_finish(u, 1.0), KVW_ERR_CANCELLED, "twice");
  /* The receiver hears of the cancel. */
  double until = now() + 30;
  int polled;
  while ((polled = kvw_request_poll(uq)) == KVW_PENDING && now() < until) sleep_s(0.01);
  CHECK(polled == KVW_ERR_CANCELLED, "the receiver's poll after the sender cancelled: %d", polled);
  EXPECT_STATUS(kvw_transfer_free(u), KVW_OK);
  MISUSE(kvw_transfer_free(u), KVW_ERR_CLOSED, "kvw_transfer");
  MISUSE(kvw_transfer_poll(u), KVW_ERR_CLOSED, "kvw_transfer");
  MISUSE(kvw_transfer_free(NULL), KVW_ERR_INVALID, "transfer");
  EXPECT_STATUS(kvw_request_free(uq), KVW_OK);
  MISUSE(kvw_request_free(uq), KVW_ERR_CLOSED, "kvw_request");
  MISUSE(kvw_request_wait(uq, 1.0), KVW_ERR_CLOSED, "kvw_request");
  MISUSE(kvw_request_poll(uq), KVW_ERR_CLOSED, "kvw_request");
  MISUSE(kvw_request_cancel((kvw_request*)s), KVW_ERR_CLOSED, "kvw_request");
}

static void timeouts(kvw_sender* s) {
  /* A request nobody sends: its deadline passes, for wait and for poll. */
  kvw_request* q = NULL;
  EXPECT_STATUS(kvw_expect(rx, "never-sent", (int[]){30}, 1, 4, 0.3, &q), KVW_OK);
  MISUSE(kvw_request_wait(q, -1), KVW_ERR_TIMEOUT, "deadline");
  MISUSE(kvw_request_poll(q), KVW_ERR_TIMEOUT, "deadline");
  EXPECT_STATUS(kvw_request_free(q), KVW_OK);
  /* wait with a timeout shorter than the deadline gives up without ending the request. */
  EXPECT_STATUS(kvw_expect(rx, "later", (int[]){31}, 1, 4, 30.0, &q), KVW_OK);
  MISUSE(kvw_request_wait(q, 0.05), KVW_ERR_TIMEOUT, "0.05");
  EXPECT_STATUS(kvw_request_poll(q), KVW_PENDING);
  EXPECT_STATUS(kvw_request_free(q), KVW_OK); /* frees and cancels it */

  /* A transfer the receiver never expects: its deadline passes, for finish and for poll. */
  kvw_transfer* t = NULL;
  EXPECT_STATUS(kvw_transfer_begin(s, "unexpected", (int[]){4}, 1, 4, 0.3, &t), KVW_OK);
  for (int layer = 0; layer < LAYERS; ++layer) EXPECT_STATUS(kvw_transfer_send_layer(t, layer, NULL), KVW_OK);
  MISUSE(kvw_transfer_finish(t, -1), KVW_ERR_TIMEOUT, NULL);
  EXPECT_STATUS(kvw_transfer_free(t), KVW_OK);
  /* Half its layers sent when the deadline passes: the poll ends it as timed out. */
  EXPECT_STATUS(kvw_transfer_begin(s, "half-sent", (int[]){5}, 1, 4, 0.3, &t), KVW_OK);
  EXPECT_STATUS(kvw_transfer_send_layer(t, 0, NULL), KVW_OK);
  double until = now() + 30;
  int polled;
  while ((polled = kvw_transfer_poll(t)) == KVW_PENDING && now() < until) sleep_s(0.01);
  CHECK(polled == KVW_ERR_TIMEOUT, "poll after the deadline: %d (%s)", polled, kvw_last_error());
  check_message("kvw_transfer_poll", __LINE__, "deadline");
  MISUSE(kvw_transfer_finish(t, 1.0), KVW_ERR_TIMEOUT, "deadline");
  MISUSE(kvw_transfer_poll(t), KVW_ERR_TIMEOUT, "deadline");
  EXPECT_STATUS(kvw_transfer_free(t), KVW_OK);
  CHECK(sender_stat(s, "active_transfers") == 0, "an expired transfer is still active");
}

static void statistics(kvw_sender* s) {
  long long needed = -1;
  EXPECT_STATUS(kvw_sender_stats_json(s, NULL, 0, &needed), KVW_OK); /* a size query */
  CHECK(needed > 2, "the size query gave %lld", needed);
  char small[16];
  memset(small, 'x', sizeof small);
  needed = -1;
  MISUSE(kvw_sender_stats_json(s, small, sizeof small, &needed), KVW_ERR_INVALID, "buf_len");
  CHECK(needed > (long long)sizeof small, "a failed stats call should still give the size needed: %lld", needed);
  CHECK(small[0] == 'x' && small[15] == 'x', "a buffer too small was written");
  MISUSE(kvw_sender_stats_json(s, small, -1, NULL), KVW_ERR_INVALID, "buf_len");
  MISUSE(kvw_receiver_stats_json(rx, NULL, 10, NULL), KVW_ERR_INVALID, "buf");
  char* big = malloc(needed + 4096);
  EXPECT_STATUS(kvw_sender_stats_json(s, big, needed + 4096, NULL), KVW_OK);
  CHECK(big[0] == '{' && strlen(big) < (size_t)needed + 4096, "statistics: %.40s", big);
  free(big);
  MISUSE(kvw_receiver_port(rx, NULL), KVW_ERR_INVALID, "port");
}

static void closing(kvw_sender* s) {
  kvw_transfer* open = NULL;
  EXPECT_STATUS(kvw_transfer_begin(s, "open-at-close", (int[]){6}, 1, 4, 30.0, &open), KVW_OK);
  EXPECT_STATUS(kvw_sender_close(s), KVW_OK);
  MISUSE(kvw_sender_close(s), KVW_ERR_CLOSED, "kvw_sender");
  MISUSE(kvw_transfer_begin(s, "after", (int[]){0}, 1, 4, 1.0, &open), KVW_ERR_CLOSED, "kvw_sender");
  MISUSE(kvw_transfer_poll(open), KVW_ERR_CANCELLED, "closed");
  EXPECT_STATUS(kvw_transfer_free(open), KVW_OK);
  MISUSE(kvw_sender_close(NULL), KVW_ERR_INVALID, "sender");
  EXPECT_STATUS(kvw_receiver_close(rx), KVW_OK);
  MISUSE(kvw_receiver_close(rx), KVW_ERR_CLOSED, "kvw_receiver");
  kvw_request* q = (kvw_request*)SENTINEL;
  MISUSE(kvw_expect(rx, "x", (int[]){0}, 1, 4, 1.0, &q), KVW_ERR_CLOSED, "kvw_receiver");
  UNTOUCHED(q);
}

int main(void) {
  cases++;
  EXPECT_STATUS(kvw_expect(NULL, "x", NULL, 0, 0, 1.0, NULL), KVW_ERR_INIT); /* before kvw_init */
  library_calls();
  caches_init(&src, 1);
  caches_init(&dst, -1);
  rx = loopback_receiver(&dst, NULL, peer, sizeof peer);
  layouts();
  cache_tensors();
  strings_and_options();
  environment();
  layout_mismatches();
  kvw_sender* s = NULL;
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, peer, SECRET, src.tensors, 8, "streams=2", &s), KVW_OK);
  transfers(s);
  timeouts(s);
  statistics(s);
  closing(s);
  caches_free(&src);
  caches_free(&dst);
  printf("%d misuse cases, %d failed\n", cases, failures);
  return failures ? 1 : 0;
}
