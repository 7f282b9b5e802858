/* The cost of one kvw_transfer_send_layer call, from C: the time the calling thread spends
 * in it (it only queues the layer; the data moves in the library's threads).
 *
 *   cc -O2 -I bindings bench/capi_send_layer.c -L build -lkvwire -Wl,-rpath,build -o send_layer
 *   KVWIRE_SECRET=... ./send_layer [TRANSFERS] [LAYERS]      (or: python3 bench/capi_overhead.py)
 *
 * Prints one line of JSON: per-call microseconds (median, mean, p90, p99, max) over
 * TRANSFERS transfers of LAYERS layers each, host caches, a receiver in the same process.
 * It compiles against kvwire.h before and after C ABI 1.0 (struct_size, the stats call). */
#define _POSIX_C_SOURCE 200809L
#include <kvwire.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HEADS 8
#define DIM 128
#define BS 16
#define BLOCKS 64

#ifdef KVW_VERSION_MAJOR
#define SIZE_FIELD(type) sizeof(type),
#else
#define SIZE_FIELD(type)
#endif

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void check(int status, const char* what) {
  if (status != KVW_OK) {
    fprintf(stderr, "%s: %s: %s\n", what, kvw_strerror(status), kvw_last_error());
    exit(1);
  }
}

static int by_value(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

int main(int argc, char** argv) {
  int transfers = argc > 1 ? atoi(argv[1]) : 200;
  int layers = argc > 2 ? atoi(argv[2]) : 32;
  const char* secret = "kvwire-bench-secret";
  check(kvw_init(), "kvw_init");
  kvw_layout layout = {SIZE_FIELD(kvw_layout) layers, HEADS, DIM, BS, KVW_BF16};
  size_t elems = (size_t)BLOCKS * BS * HEADS * DIM;
  kvw_tensor* src = calloc(2 * layers, sizeof(kvw_tensor));
  kvw_tensor* dst = calloc(2 * layers, sizeof(kvw_tensor));
  for (int i = 0; i < 2 * layers; ++i) {
    kvw_tensor a = {SIZE_FIELD(kvw_tensor) calloc(elems, 2), BLOCKS, {BS * HEADS * DIM, HEADS * DIM, DIM, 1}, -1};
    kvw_tensor b = {SIZE_FIELD(kvw_tensor) calloc(elems, 2), BLOCKS, {BS * HEADS * DIM, HEADS * DIM, DIM, 1}, -1};
    src[i] = a, dst[i] = b;
  }
  kvw_receiver* rx;
  kvw_sender* tx;
  int port;
  char peer[64];
  check(kvw_receiver_create(&layout, "127.0.0.1:0", secret, dst, 2 * layers, NULL, &rx), "receiver");
  check(kvw_receiver_port(rx, &port), "port");
  snprintf(peer, sizeof peer, "127.0.0.1:%d", port);
  check(kvw_sender_create(&layout, peer, secret, src, 2 * layers, "streams=2", &tx), "sender");

  double* spent = calloc((size_t)transfers * layers, sizeof(double));
  int blocks[2] = {0, 1}, where[2] = {10, 11};
  for (int n = 0; n < transfers; ++n) {
    char id[32];
    snprintf(id, sizeof id, "bench-%d", n);
    kvw_request* rq;
    kvw_transfer* t;
    check(kvw_expect(rx, id, where, 2, 2 * BS, 30.0, &rq), "expect");
    check(kvw_transfer_begin(tx, id, blocks, 2, 2 * BS, 30.0, &t), "begin");
    for (int layer = 0; layer < layers; ++layer) {
      double t0 = now();
      int rc = kvw_transfer_send_layer(t, layer, NULL);
      spent[n * layers + layer] = now() - t0;
      check(rc, "send_layer");
    }
    check(kvw_transfer_finish(t, 30.0), "finish");
    check(kvw_request_wait(rq, 30.0), "wait");
    kvw_transfer_free(t);
    kvw_request_free(rq);
  }
  size_t count = (size_t)transfers * layers;
  double sum = 0;
  for (size_t i = 0; i < count; ++i) sum += spent[i];
  qsort(spent, count, sizeof(double), by_value);
  printf("{\"version\": \"%s\", \"calls\": %zu, \"median_us\": %.3f, \"mean_us\": %.3f, \"p90_us\": %.3f, "
         "\"p99_us\": %.3f, \"max_us\": %.1f}\n",
         kvw_version(), count, spent[count / 2] * 1e6, sum / count * 1e6, spent[count * 9 / 10] * 1e6,
         spent[count * 99 / 100] * 1e6, spent[count - 1] * 1e6);
  kvw_sender_close(tx);
  kvw_receiver_close(rx);
  return 0;
}
