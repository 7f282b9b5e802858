/* Tests of libkvwire.so through kvwire.h only, as a C runtime would use it.
 * Usage: test_capi PYTHON PY_PEER_SCRIPT (ctest passes both). */
#define _POSIX_C_SOURCE 200809L
#include "kvwire.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LAYERS 4
#define HEADS 2
#define DIM 64
#define BS 16
#define BLOCKS 64
#define ELEMS (BLOCKS * BS * HEADS * DIM)
#define SECRET "kvwire-capi-test-secret"

static int failures = 0;
static const char* python;
static const char* peer_script;

#define CHECK(cond, ...)                                                          \
  do {                                                                            \
    if (!(cond)) {                                                                \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                        \
      fprintf(stderr, __VA_ARGS__);                                               \
      fprintf(stderr, "\n      last error: %s\n", kvw_last_error());              \
      failures++;                                                                 \
    }                                                                             \
  } while (0)

#define EXPECT_STATUS(call, want)                                                 \
  do {                                                                            \
    int rc_ = (call);                                                             \
    CHECK(rc_ == (want), "%s returned %d (%s), expected %d", #call, rc_,          \
          kvw_strerror(rc_), (want));                                             \
  } while (0)

static const kvw_layout LAYOUT = {LAYERS, HEADS, DIM, BS, KVW_FP32};

/* The same formula as py_peer.py: value of element i of cache tensor t. */
static float pattern(long i, int t, int seed) { return (float)((i * 7 + t * 131 + seed) % 1000) * 0.5f; }

typedef struct {
  float* data[LAYERS * 2];
  kvw_tensor tensors[LAYERS * 2];
} caches;

static void caches_init(caches* c, int seed) {
  for (int t = 0; t < LAYERS * 2; ++t) {
    c->data[t] = malloc(sizeof(float) * ELEMS);
    for (long i = 0; i < ELEMS; ++i) c->data[t][i] = seed < 0 ? 0.0f : pattern(i, t, seed);
    kvw_tensor x = {c->data[t], BLOCKS, {BS * HEADS * DIM, HEADS * DIM, DIM, 1}, -1};
    c->tensors[t] = x;
  }
}

static void caches_free(caches* c) {
  for (int t = 0; t < LAYERS * 2; ++t) free(c->data[t]);
}

/* Do tokens [0, n) of src blocks equal those of dst blocks? */
static int same_tokens(caches* src, const int* sb, caches* dst, const int* db, int n) {
  for (int t = 0; t < LAYERS * 2; ++t)
    for (int tok = 0; tok < n; ++tok) {
      const float* a = src->data[t] + ((long)sb[tok / BS] * BS + tok % BS) * HEADS * DIM;
      const float* b = dst->data[t] + ((long)db[tok / BS] * BS + tok % BS) * HEADS * DIM;
      if (memcmp(a, b, sizeof(float) * HEADS * DIM)) return 0;
    }
  return 1;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void test_errors(void) {
  caches c;
  caches_init(&c, 0);
  kvw_sender* s = NULL;
  kvw_receiver* r = NULL;
  kvw_request* q = NULL;

  EXPECT_STATUS(kvw_sender_create(NULL, "127.0.0.1:1", SECRET, c.tensors, 8, NULL, &s), KVW_ERR_INVALID);
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, "127.0.0.1:1", SECRET, c.tensors, 7, NULL, &s), KVW_ERR_INVALID);
  CHECK(strstr(kvw_last_error(), "num_caches") != NULL, "the message should name num_caches");
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, "127.0.0.1:1", SECRET, c.tensors, 8, "streams=2,colour=red", &s),
                KVW_ERR_INVALID);
  CHECK(strstr(kvw_last_error(), "colour") != NULL, "the message should name the unknown option");
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, "127.0.0.1:1", SECRET, c.tensors, 8, "connect_timeout=2", &s),
                KVW_ERR_PEER_LOST);
  EXPECT_STATUS(kvw_expect(NULL, "x", (int[]){0}, 1, 4, 1.0, &q), KVW_ERR_INVALID);

  EXPECT_STATUS(kvw_receiver_create(&LAYOUT, "127.0.0.1:0", SECRET, c.tensors, 8, NULL, &r), KVW_OK);
  int port = 0;
  EXPECT_STATUS(kvw_receiver_port(r, &port), KVW_OK);
  char peer[64];
  snprintf(peer, sizeof peer, "127.0.0.1:%d", port);
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, peer, "not-the-secret", c.tensors, 8, NULL, &s), KVW_ERR_AUTH);

  /* A request nobody sends: its deadline passes. */
  EXPECT_STATUS(kvw_expect(r, "never", (int[]){3}, 1, 4, 0.3, &q), KVW_OK);
  double t0 = now();
  EXPECT_STATUS(kvw_request_wait(q, -1), KVW_ERR_TIMEOUT);
  CHECK(now() - t0 < 3.0, "the timeout should come at the deadline");
  EXPECT_STATUS(kvw_request_free(q), KVW_OK);
  EXPECT_STATUS(kvw_request_wait(q, 1.0), KVW_ERR_CLOSED); /* use after free */

  EXPECT_STATUS(kvw_expect(r, "bad-block", (int[]){BLOCKS}, 1, 4, 1.0, &q), KVW_ERR_INVALID);
  char small[8];
  EXPECT_STATUS(kvw_receiver_stats_json(r, small, sizeof small), KVW_ERR_INVALID);
  EXPECT_STATUS(kvw_receiver_close(r), KVW_OK);
  EXPECT_STATUS(kvw_receiver_close(r), KVW_ERR_CLOSED); /* use after close */
  EXPECT_STATUS(kvw_expect(r, "x", (int[]){0}, 1, 4, 1.0, &q), KVW_ERR_CLOSED);
  caches_free(&c);
}

typedef struct {
  kvw_sender* sender;
  int index;
  int status;
} thread_arg;

static void* send_one(void* p) {
  thread_arg* a = p;
  char id[32];
  snprintf(id, sizeof id, "thread-%d", a->index);
  int blocks[4] = {a->index * 4, a->index * 4 + 1, a->index * 4 + 2, a->index * 4 + 3};
  kvw_transfer* t = NULL;
  a->status = kvw_transfer_begin(a->sender, id, blocks, 4, 60, 30.0, &t);
  for (int layer = 0; layer < LAYERS && a->status == KVW_OK; ++layer)
    a->status = kvw_transfer_send_layer(t, layer, NULL);
  if (a->status == KVW_OK) a->status = kvw_transfer_finish(t, 30.0);
  if (t) kvw_transfer_free(t);
  return NULL;
}

static void test_threads_and_overhead(void) {
  caches src, dst;
  caches_init(&src, 3);
  caches_init(&dst, -1);
  kvw_receiver* r = NULL;
  kvw_sender* s = NULL;
  EXPECT_STATUS(kvw_receiver_create(&LAYOUT, "127.0.0.1:0", SECRET, dst.tensors, 8, "staging_mib=64", &r), KVW_OK);
  int port = 0;
  kvw_receiver_port(r, &port);
  char peer[64];
  snprintf(peer, sizeof peer, "127.0.0.1:%d", port);
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, peer, SECRET, src.tensors, 8, "streams=4,chunk_kib=64", &s), KVW_OK);

  kvw_request* q[4];
  int dst_blocks[4][4];
  for (int i = 0; i < 4; ++i) {
    char id[32];
    snprintf(id, sizeof id, "thread-%d", i);
    for (int b = 0; b < 4; ++b) dst_blocks[i][b] = 63 - (i * 4 + b);
    EXPECT_STATUS(kvw_expect(r, id, dst_blocks[i], 4, 60, 30.0, &q[i]), KVW_OK);
  }
  pthread_t threads[4];
  thread_arg args[4];
  for (int i = 0; i < 4; ++i) {
    args[i] = (thread_arg){s, i, -1};
    pthread_create(&threads[i], NULL, send_one, &args[i]);
  }
  for (int i = 0; i < 4; ++i) {
    pthread_join(threads[i], NULL);
    CHECK(args[i].status == KVW_OK, "thread %d finished with %d (%s)", i, args[i].status, kvw_strerror(args[i].status));
    EXPECT_STATUS(kvw_request_wait(q[i], 30.0), KVW_OK);
    int src_blocks[4] = {i * 4, i * 4 + 1, i * 4 + 2, i * 4 + 3};
    CHECK(same_tokens(&src, src_blocks, &dst, dst_blocks[i], 60), "thread %d: destination differs", i);
    kvw_request_free(q[i]);
  }

  /* Per-call overhead of send_layer (it only queues work: microseconds, not milliseconds). */
  const int rounds = 100;
  double spent = 0;
  for (int n = 0; n < rounds; ++n) {
    char id[32];
    snprintf(id, sizeof id, "overhead-%d", n);
    kvw_request* rq = NULL;
    kvw_transfer* t = NULL;
    kvw_expect(r, id, (int[]){40}, 1, 16, 30.0, &rq);
    kvw_transfer_begin(s, id, (int[]){1}, 1, 16, 30.0, &t);
    for (int layer = 0; layer < LAYERS; ++layer) {
      double t0 = now();
      int rc = kvw_transfer_send_layer(t, layer, NULL);
      spent += now() - t0;
      CHECK(rc == KVW_OK, "send_layer: %d", rc);
    }
    EXPECT_STATUS(kvw_transfer_finish(t, 30.0), KVW_OK);
    EXPECT_STATUS(kvw_request_wait(rq, 30.0), KVW_OK);
    kvw_transfer_free(t);
    kvw_request_free(rq);
  }
  printf("send_layer from C: %.1f us per call (mean of %d)\n", spent / (rounds * LAYERS) * 1e6, rounds * LAYERS);

  char stats[65536];
  EXPECT_STATUS(kvw_sender_stats_json(s, stats, sizeof stats), KVW_OK);
  CHECK(strstr(stats, "\"rtt_us\"") != NULL, "sender statistics should carry TCP_INFO");
  EXPECT_STATUS(kvw_sender_close(s), KVW_OK);
  EXPECT_STATUS(kvw_receiver_close(r), KVW_OK);
  caches_free(&src);
  caches_free(&dst);
}

static void test_c_sender_to_python_receiver(void) {
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "%s %s receive", python, peer_script);
  FILE* peer = popen(cmd, "r");
  int port = 0;
  CHECK(peer && fscanf(peer, "%d", &port) == 1, "the Python receiver did not print its port");
  caches src;
  caches_init(&src, 1);
  char address[64];
  snprintf(address, sizeof address, "127.0.0.1:%d", port);
  kvw_sender* s = NULL;
  kvw_transfer* t = NULL;
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, address, SECRET, src.tensors, 8, "streams=2", &s), KVW_OK);
  EXPECT_STATUS(kvw_transfer_begin(s, "from-c", (int[]){0, 1, 2}, 3, 40, 60.0, &t), KVW_OK);
  for (int layer = 0; layer < LAYERS; ++layer) EXPECT_STATUS(kvw_transfer_send_layer(t, layer, NULL), KVW_OK);
  EXPECT_STATUS(kvw_transfer_finish(t, 60.0), KVW_OK);
  kvw_transfer_free(t);
  kvw_sender_close(s);
  int status = peer ? pclose(peer) : -1;
  CHECK(status == 0, "the Python receiver reported a mismatch or failed (status %d)", status);
  caches_free(&src);
}

static void test_python_sender_to_c_receiver(void) {
  caches dst, expected;
  caches_init(&dst, -1);
  caches_init(&expected, 2);
  kvw_receiver* r = NULL;
  kvw_request* q = NULL;
  EXPECT_STATUS(kvw_receiver_create(&LAYOUT, "127.0.0.1:0", SECRET, dst.tensors, 8, NULL, &r), KVW_OK);
  int port = 0;
  kvw_receiver_port(r, &port);
  int blocks[3] = {20, 9, 33};
  EXPECT_STATUS(kvw_expect(r, "from-py", blocks, 3, 33, 60.0, &q), KVW_OK);
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "%s %s send %d", python, peer_script, port);
  FILE* peer = popen(cmd, "r");
  EXPECT_STATUS(kvw_request_wait_layer(q, 0, 60.0), KVW_OK);
  EXPECT_STATUS(kvw_request_wait(q, 60.0), KVW_OK);
  int status = peer ? pclose(peer) : -1;
  CHECK(status == 0, "the Python sender failed (status %d)", status);
  CHECK(same_tokens(&expected, (int[]){5, 6, 7}, &dst, blocks, 33), "the C receiver's destination differs");
  kvw_request_free(q);
  kvw_receiver_close(r);
  caches_free(&dst);
  caches_free(&expected);
}

/* A transfer from C to C over UCX, and a bad transport named as such. Skipped, saying
 * so, when the embedded Python has no UCXX. */
static void test_ucx_transport(void) {
  caches src, dst;
  caches_init(&src, 3);
  caches_init(&dst, -1);
  kvw_receiver* r = NULL;
  kvw_sender* s = NULL;
  kvw_request* q = NULL;
  kvw_transfer* t = NULL;
  int status = kvw_receiver_create(&LAYOUT, "127.0.0.1:0", SECRET, dst.tensors, 8, "transport=ucx", &r);
  if (status != KVW_OK && strstr(kvw_last_error(), "ucxx") != NULL) {
    printf("test_ucx_transport: SKIPPED, UCXX is not installed (%s)\n", kvw_last_error());
    caches_free(&src);
    caches_free(&dst);
    return;
  }
  EXPECT_STATUS(status, KVW_OK);
  int port = 0;
  EXPECT_STATUS(kvw_receiver_port(r, &port), KVW_OK);
  char peer[64];
  snprintf(peer, sizeof peer, "127.0.0.1:%d", port);
  int src_blocks[3] = {4, 5, 6}, dst_blocks[3] = {30, 2, 17};
  EXPECT_STATUS(kvw_expect(r, "over-ucx", dst_blocks, 3, 37, 60.0, &q), KVW_OK);
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, peer, SECRET, src.tensors, 8, "transport=ucx,streams=2", &s), KVW_OK);
  EXPECT_STATUS(kvw_transfer_begin(s, "over-ucx", src_blocks, 3, 37, 60.0, &t), KVW_OK);
  for (int layer = 0; layer < LAYERS; ++layer) EXPECT_STATUS(kvw_transfer_send_layer(t, layer, NULL), KVW_OK);
  EXPECT_STATUS(kvw_transfer_finish(t, 60.0), KVW_OK);
  EXPECT_STATUS(kvw_request_wait(q, 60.0), KVW_OK);
  CHECK(same_tokens(&src, src_blocks, &dst, dst_blocks, 37), "the UCX transfer's destination differs");
  char stats[65536];
  EXPECT_STATUS(kvw_sender_stats_json(s, stats, sizeof stats), KVW_OK);
  CHECK(strstr(stats, "\"transport\": \"ucx\"") != NULL, "sender statistics should name the UCX transport");
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, peer, SECRET, src.tensors, 8, "transport=carrier-pigeon", NULL),
                KVW_ERR_INVALID);
  kvw_transfer_free(t);
  kvw_request_free(q);
  kvw_sender_close(s);
  kvw_receiver_close(r);
  caches_free(&src);
  caches_free(&dst);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s PYTHON PY_PEER_SCRIPT\n", argv[0]);
    return 2;
  }
  python = argv[1];
  peer_script = argv[2];
  EXPECT_STATUS(kvw_expect(NULL, "x", NULL, 0, 0, 1.0, NULL), KVW_ERR_INIT); /* before kvw_init */
  double t0 = now();
  EXPECT_STATUS(kvw_init(), KVW_OK);
  printf("kvw_init: %.2f s; kvwire %s\n", now() - t0, kvw_version());
  EXPECT_STATUS(kvw_init(), KVW_OK); /* idempotent */
  CHECK(strcmp(kvw_strerror(KVW_ERR_TIMEOUT), "timed out") == 0, "strerror");

  test_errors();
  test_threads_and_overhead();
  test_c_sender_to_python_receiver();
  test_python_sender_to_c_receiver();
  test_ucx_transport();

  printf("%d failed\n", failures);
  return failures ? 1 : 0;
}
