/* Tests of libkvwire.so through kvwire.h only, as a C runtime would use it: transfers
 * between C and Python peers, threads, polling, logging, versions. The misuse cases are
 * in test_misuse.c. Usage: test_capi PYTHON PY_PEER_SCRIPT (ctest passes both). */
#define _GNU_SOURCE /* syscall(SYS_gettid) */
#include <fcntl.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "capi_test.h"

static const char* python;
static const char* peer_script;

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

static void test_threads(void) {
  caches src, dst;
  caches_init(&src, 3);
  caches_init(&dst, -1);
  char peer[64];
  kvw_receiver* r = loopback_receiver(&dst, "staging_mib=64", peer, sizeof peer);
  kvw_sender* s = NULL;
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
  char stats[65536];
  EXPECT_STATUS(kvw_sender_stats_json(s, stats, sizeof stats, NULL), KVW_OK);
  CHECK(strstr(stats, "\"rtt_us\"") != NULL, "sender statistics should carry TCP_INFO");
  EXPECT_STATUS(kvw_sender_close(s), KVW_OK);
  EXPECT_STATUS(kvw_receiver_close(r), KVW_OK);
  caches_free(&src);
  caches_free(&dst);
}

/* -- polling ------------------------------------------------------------------------------ */
typedef struct {
  kvw_receiver* receiver;
  kvw_sender* sender;
  const char* id;
  const int* blocks;
  int num_tokens;
  double delay_s; /* before expect / between layers */
  kvw_request* request;
  int status;
} slow_peer;

/* A receiver that names the destination only after delay_s: until then the sender's
 * transfer cannot complete, however often it is polled. */
static void* expect_late(void* p) {
  slow_peer* a = p;
  sleep_s(a->delay_s);
  a->status = kvw_expect(a->receiver, a->id, a->blocks, 2, a->num_tokens, 60.0, &a->request);
  return NULL;
}

/* A sender that computes slowly: delay_s before each layer. */
static void* send_slowly(void* p) {
  slow_peer* a = p;
  kvw_transfer* t = NULL;
  a->status = kvw_transfer_begin(a->sender, a->id, a->blocks, 2, a->num_tokens, 60.0, &t);
  for (int layer = 0; layer < LAYERS && a->status == KVW_OK; ++layer) {
    sleep_s(a->delay_s);
    a->status = kvw_transfer_send_layer(t, layer, NULL);
  }
  if (a->status == KVW_OK) a->status = kvw_transfer_finish(t, 60.0);
  if (t) kvw_transfer_free(t);
  return NULL;
}

/* Poll until the status is not KVW_PENDING (or 60 s pass); count the polls that were. */
static int poll_until_done(int (*poll)(void*), void* handle, int* pending) {
  double until = now() + 60;
  int status;
  *pending = 0;
  while ((status = poll(handle)) == KVW_PENDING && now() < until) {
    ++*pending;
    sleep_s(0.005);
  }
  return status;
}
static int poll_transfer(void* t) { return kvw_transfer_poll(t); }
static int poll_request(void* q) { return kvw_request_poll(q); }

static void test_polling(void) {
  caches src, dst;
  caches_init(&src, 4);
  caches_init(&dst, -1);
  char peer[64];
  kvw_receiver* r = loopback_receiver(&dst, NULL, peer, sizeof peer);
  kvw_sender* s = NULL;
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, peer, SECRET, src.tensors, 8, "streams=2", &s), KVW_OK);

  /* The sender polls while the receiver takes 1.5 s to expect: polls never cancel. */
  int src_blocks[2] = {10, 11}, dst_blocks[2] = {50, 3};
  slow_peer late = {r, NULL, "late-receiver", dst_blocks, 30, 1.5, NULL, -1};
  kvw_transfer* t = NULL;
  EXPECT_STATUS(kvw_transfer_begin(s, "late-receiver", src_blocks, 2, 30, 60.0, &t), KVW_OK);
  for (int layer = 0; layer < LAYERS; ++layer) EXPECT_STATUS(kvw_transfer_send_layer(t, layer, NULL), KVW_OK);
  pthread_t thread;
  pthread_create(&thread, NULL, expect_late, &late);
  int pending = 0;
  int status = poll_until_done(poll_transfer, t, &pending);
  pthread_join(thread, NULL);
  EXPECT_STATUS(late.status, KVW_OK);
  CHECK(status == KVW_OK, "the polled transfer ended with %d (%s)", status, kvw_strerror(status));
  CHECK(pending > 1, "the transfer cannot complete before the receiver's expect, yet polls saw it pending %d times",
        pending);
  EXPECT_STATUS(kvw_transfer_poll(t), KVW_OK); /* the outcome stays */
  EXPECT_STATUS(kvw_request_wait(late.request, 30.0), KVW_OK);
  CHECK(same_tokens(&src, src_blocks, &dst, dst_blocks, 30), "the late receiver's destination differs");
  kvw_request_free(late.request);
  kvw_transfer_free(t);

  /* The receiver polls while the sender sends a layer every 0.3 s. */
  int src2[2] = {20, 21}, dst2[2] = {7, 40};
  kvw_request* q = NULL;
  EXPECT_STATUS(kvw_expect(r, "slow-sender", dst2, 2, 25, 60.0, &q), KVW_OK);
  slow_peer slow = {NULL, s, "slow-sender", src2, 25, 0.3, NULL, -1};
  pthread_create(&thread, NULL, send_slowly, &slow);
  status = poll_until_done(poll_request, q, &pending);
  pthread_join(thread, NULL);
  EXPECT_STATUS(slow.status, KVW_OK);
  CHECK(status == KVW_OK, "the polled request ended with %d (%s)", status, kvw_strerror(status));
  CHECK(pending > 1, "the request was pending %d times while its layers came 0.3 s apart", pending);
  CHECK(same_tokens(&src, src2, &dst, dst2, 25), "the polled request's destination differs");
  kvw_request_free(q);

  /* Failures come out of the poll with their status: the receiver cancels. */
  EXPECT_STATUS(kvw_expect(r, "refused", dst2, 2, 25, 60.0, &q), KVW_OK);
  EXPECT_STATUS(kvw_transfer_begin(s, "refused", src2, 2, 25, 60.0, &t), KVW_OK);
  EXPECT_STATUS(kvw_transfer_send_layer(t, 0, NULL), KVW_OK);
  EXPECT_STATUS(kvw_request_cancel(q), KVW_OK);
  EXPECT_STATUS(kvw_request_poll(q), KVW_ERR_CANCELLED);
  status = poll_until_done(poll_transfer, t, &pending);
  CHECK(status == KVW_ERR_CANCELLED, "the sender's poll after the receiver cancelled: %d (%s)", status,
        kvw_last_error());
  kvw_transfer_free(t);
  kvw_request_free(q);

  kvw_sender_close(s);
  kvw_receiver_close(r);
  caches_free(&src);
  caches_free(&dst);
}

/* -- logging ------------------------------------------------------------------------------ */
typedef struct {
  pthread_mutex_t lock;
  int calls, lost, wrong_level, overlapped, inside;
  long tids[64];
  int num_tids;
} log_sink;

static void on_log(int level, const char* message, void* user_data) {
  log_sink* sink = user_data;
  if (__atomic_fetch_add(&sink->inside, 1, __ATOMIC_SEQ_CST)) __atomic_fetch_add(&sink->overlapped, 1, __ATOMIC_SEQ_CST);
  long tid = syscall(SYS_gettid);
  pthread_mutex_lock(&sink->lock);
  sink->calls++;
  if (strstr(message, " lost")) sink->lost++;
  if (level != KVW_LOG_WARNING) sink->wrong_level++;
  int known = 0;
  for (int i = 0; i < sink->num_tids; ++i) known |= sink->tids[i] == tid;
  if (!known && sink->num_tids < 64) sink->tids[sink->num_tids++] = tid;
  pthread_mutex_unlock(&sink->lock);
  sleep_s(0.001); /* a callback that takes a moment, so calls at once would overlap */
  __atomic_fetch_sub(&sink->inside, 1, __ATOMIC_SEQ_CST);
}

static int sink_lost(log_sink* sink) {
  pthread_mutex_lock(&sink->lock);
  int n = sink->lost;
  pthread_mutex_unlock(&sink->lock);
  return n;
}

/* A sender with `streams` connections whose receiver closes: the reader thread of each
 * connection warns that it is lost. Returns once the sender's open transfer has failed,
 * which happens after the warning of its last connection. */
static void lose_connections(caches* src, caches* dst, int streams) {
  char peer[64], options[32];
  kvw_receiver* r = loopback_receiver(dst, NULL, peer, sizeof peer);
  kvw_sender* s = NULL;
  kvw_transfer* t = NULL;
  snprintf(options, sizeof options, "streams=%d", streams);
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, peer, SECRET, src->tensors, 8, options, &s), KVW_OK);
  EXPECT_STATUS(kvw_transfer_begin(s, "doomed", (int[]){0}, 1, 4, 60.0, &t), KVW_OK);
  EXPECT_STATUS(kvw_receiver_close(r), KVW_OK);
  double until = now() + 30;
  int status;
  while ((status = kvw_transfer_poll(t)) == KVW_PENDING && now() < until) sleep_s(0.005);
  CHECK(status == KVW_ERR_PEER_LOST, "the sender's transfer ended with %d after its receiver closed", status);
  kvw_transfer_free(t);
  kvw_sender_close(s);
}

/* Standard error into a file, and back: what was written in between (caller frees). */
static int stderr_fd = -1, saved_stderr = -1;
static void capture_stderr(void) {
  char path[] = "/tmp/kvwire-test-stderr-XXXXXX";
  stderr_fd = mkstemp(path);
  unlink(path);
  fflush(stderr);
  saved_stderr = dup(2);
  dup2(stderr_fd, 2);
}
static char* captured_stderr(void) {
  fflush(stderr);
  dup2(saved_stderr, 2);
  close(saved_stderr);
  off_t size = lseek(stderr_fd, 0, SEEK_END);
  char* text = calloc(1, size + 1);
  if (pread(stderr_fd, text, size, 0) != size) text[0] = 0;
  close(stderr_fd);
  return text;
}

static void test_logging(void) {
  caches src, dst;
  caches_init(&src, 5);
  caches_init(&dst, -1);

  /* By default warnings go to standard error. */
  capture_stderr();
  lose_connections(&src, &dst, 1);
  char* out = captured_stderr();
  CHECK(strstr(out, " lost") != NULL, "no warning on standard error by default: \"%s\"", out);
  free(out);

  /* With a callback: every warning goes to it, from the library's threads, one call at a time. */
  log_sink sink = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0, {0}, 0};
  EXPECT_STATUS(kvw_set_log_callback(on_log, &sink), KVW_OK);
  enum { STREAMS = 4 };
  capture_stderr();
  lose_connections(&src, &dst, STREAMS);
  double until = now() + 30;
  while (sink_lost(&sink) < STREAMS && now() < until) sleep_s(0.01);
  out = captured_stderr();
  CHECK(strstr(out, " lost") == NULL, "with a callback set, standard error still got: \"%s\"", out);
  free(out);
  CHECK(sink_lost(&sink) == STREAMS, "%d warnings of a lost connection for %d connections", sink_lost(&sink), STREAMS);
  CHECK(sink.wrong_level == 0, "%d messages were not warnings", sink.wrong_level);
  CHECK(sink.overlapped == 0, "the callback ran %d times while another call was running", sink.overlapped);
  CHECK(sink.num_tids >= 2, "the callback was called from %d thread(s); each connection has its own", sink.num_tids);
  int logged = sink_lost(&sink);

  /* Below the level, nothing is delivered. */
  EXPECT_STATUS(kvw_set_log_level(KVW_LOG_ERROR), KVW_OK);
  lose_connections(&src, &dst, 1);
  CHECK(sink_lost(&sink) == logged, "a warning reached the callback at level KVW_LOG_ERROR");
  EXPECT_STATUS(kvw_set_log_level(KVW_LOG_WARNING), KVW_OK);

  /* NULL: back to standard error. */
  EXPECT_STATUS(kvw_set_log_callback(NULL, NULL), KVW_OK);
  capture_stderr();
  lose_connections(&src, &dst, 1);
  out = captured_stderr();
  CHECK(strstr(out, " lost") != NULL, "no warning on standard error after the callback was removed");
  free(out);
  CHECK(sink_lost(&sink) == logged, "the callback was called after it was removed");

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

/* A path that damages every payload (py_peer.py's relay, which flips a bit of each): the
 * receiver asks again a bounded number of times, then both sides end with
 * KVW_ERR_CHECKSUM, within the deadline, and the destination outside the request stays zero. */
static void test_damaged_path(void) {
  caches src, dst;
  caches_init(&src, 4);
  caches_init(&dst, -1);
  char peer[64];
  kvw_receiver* r = loopback_receiver(&dst, NULL, peer, sizeof peer);
  int port = atoi(strchr(peer, ':') + 1);
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "%s %s damage %d", python, peer_script, port);
  FILE* relay = popen(cmd, "r");
  int relay_port = 0;
  CHECK(relay && fscanf(relay, "%d", &relay_port) == 1, "the damaging relay did not print its port");
  char address[64];
  snprintf(address, sizeof address, "127.0.0.1:%d", relay_port);
  kvw_request* q = NULL;
  kvw_sender* s = NULL;
  kvw_transfer* t = NULL;
  int dst_blocks[2] = {40, 41};
  double t0 = now();
  EXPECT_STATUS(kvw_expect(r, "damaged", dst_blocks, 2, 20, 30.0, &q), KVW_OK);
  EXPECT_STATUS(kvw_sender_create(&LAYOUT, address, SECRET, src.tensors, 8, "streams=2,chunk_kib=4", &s), KVW_OK);
  EXPECT_STATUS(kvw_transfer_begin(s, "damaged", (int[]){0, 1}, 2, 20, 30.0, &t), KVW_OK);
  /* The transfer may fail before its last layer: those are dropped, not refused. */
  for (int layer = 0; layer < LAYERS; ++layer) EXPECT_STATUS(kvw_transfer_send_layer(t, layer, NULL), KVW_OK);
  EXPECT_STATUS(kvw_transfer_finish(t, 30.0), KVW_ERR_CHECKSUM);
  CHECK(strstr(kvw_last_error(), "checksum") != NULL, "the sender's error should say why: %s", kvw_last_error());
  EXPECT_STATUS(kvw_request_wait(q, 30.0), KVW_ERR_CHECKSUM);
  CHECK(now() - t0 < 20.0, "the failure took %.1f s", now() - t0);
  CHECK(receiver_stat(r, "checksum_failures") > 0, "the receiver counted no checksum failure");
  int zero = 1;
  for (int i = 0; i < LAYERS * 2; ++i)
    for (long e = 0; e < ELEMS; ++e)
      if (e / (BS * HEADS * DIM) != 40 && e / (BS * HEADS * DIM) != 41 && dst.data[i][e] != 0.0f) zero = 0;
  CHECK(zero, "a block outside the request was written");
  kvw_transfer_free(t);
  kvw_request_free(q);
  kvw_sender_close(s);
  kvw_receiver_close(r);
  int status = relay ? pclose(relay) : -1;
  CHECK(status == 0, "the damaging relay failed or damaged nothing (status %d)", status);
  caches_free(&src);
  caches_free(&dst);
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
  EXPECT_STATUS(kvw_sender_stats_json(s, stats, sizeof stats, NULL), KVW_OK);
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
  /* The version calls work before kvw_init, and the library is the header's version. */
  CHECK(kvw_version_number() == KVW_VERSION_NUMBER, "library %d, header %d", kvw_version_number(), KVW_VERSION_NUMBER);
  char version[32];
  snprintf(version, sizeof version, "%d.%d.%d", KVW_VERSION_MAJOR, KVW_VERSION_MINOR, KVW_VERSION_PATCH);
  CHECK(strcmp(kvw_version(), version) == 0, "kvw_version() is %s, the header says %s", kvw_version(), version);
  CHECK(KVW_VERSION_NUMBER == KVW_VERSION_MAJOR * 10000 + KVW_VERSION_MINOR * 100 + KVW_VERSION_PATCH, "number");
  EXPECT_STATUS(kvw_expect(NULL, "x", NULL, 0, 0, 1.0, NULL), KVW_ERR_INIT); /* before kvw_init */
  double t0 = now();
  EXPECT_STATUS(kvw_init(), KVW_OK);
  printf("kvw_init: %.2f s; kvwire %s\n", now() - t0, kvw_version());
  EXPECT_STATUS(kvw_init(), KVW_OK); /* idempotent */
  CHECK(strcmp(kvw_strerror(KVW_ERR_TIMEOUT), "timed out") == 0, "strerror");
  CHECK(strstr(kvw_strerror(KVW_ERR_CHECKSUM), "checksum") != NULL, "strerror of KVW_ERR_CHECKSUM");

  test_logging();
  test_threads();
  test_polling();
  test_c_sender_to_python_receiver();
  test_python_sender_to_c_receiver();
  test_damaged_path();
  test_ucx_transport();

  printf("%d failed\n", failures);
  return failures ? 1 : 0;
}
