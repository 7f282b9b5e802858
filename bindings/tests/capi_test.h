/* What the C tests share: checks that count failures, a small paged cache, a clock.
 * Header-only (static functions): each test program includes it once. */
#ifndef KVWIRE_CAPI_TEST_H
#define KVWIRE_CAPI_TEST_H

#define _POSIX_C_SOURCE 200809L
#include "kvwire.h"

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

static const kvw_layout LAYOUT = {sizeof(kvw_layout), LAYERS, HEADS, DIM, BS, KVW_FP32};

/* The same formula as py_peer.py: value of element i of cache tensor t. */
static inline float pattern(long i, int t, int seed) { return (float)((i * 7 + t * 131 + seed) % 1000) * 0.5f; }

typedef struct {
  float* data[LAYERS * 2];
  kvw_tensor tensors[LAYERS * 2];
} caches;

/* k and v of every layer, [BLOCKS, BS, HEADS, DIM] floats; seed < 0 fills zeros. */
static inline void caches_init(caches* c, int seed) {
  for (int t = 0; t < LAYERS * 2; ++t) {
    c->data[t] = malloc(sizeof(float) * ELEMS);
    for (long i = 0; i < ELEMS; ++i) c->data[t][i] = seed < 0 ? 0.0f : pattern(i, t, seed);
    kvw_tensor x = {sizeof(kvw_tensor), c->data[t], BLOCKS, {BS * HEADS * DIM, HEADS * DIM, DIM, 1}, -1};
    c->tensors[t] = x;
  }
}

static inline void caches_free(caches* c) {
  for (int t = 0; t < LAYERS * 2; ++t) free(c->data[t]);
}

/* Do tokens [0, n) of src blocks equal those of dst blocks? */
static inline int same_tokens(caches* src, const int* sb, caches* dst, const int* db, int n) {
  for (int t = 0; t < LAYERS * 2; ++t)
    for (int tok = 0; tok < n; ++tok) {
      const float* a = src->data[t] + ((long)sb[tok / BS] * BS + tok % BS) * HEADS * DIM;
      const float* b = dst->data[t] + ((long)db[tok / BS] * BS + tok % BS) * HEADS * DIM;
      if (memcmp(a, b, sizeof(float) * HEADS * DIM)) return 0;
    }
  return 1;
}

static inline double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline void sleep_s(double seconds) {
  struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
  nanosleep(&ts, NULL);
}

/* A receiver on a free loopback port; its "host:port" goes into peer. */
static inline kvw_receiver* loopback_receiver(caches* dst, const char* options, char* peer, size_t peer_len) {
  kvw_receiver* r = NULL;
  EXPECT_STATUS(kvw_receiver_create(&LAYOUT, "127.0.0.1:0", SECRET, dst->tensors, LAYERS * 2, options, &r), KVW_OK);
  int port = 0;
  if (r) EXPECT_STATUS(kvw_receiver_port(r, &port), KVW_OK);
  snprintf(peer, peer_len, "127.0.0.1:%d", port);
  return r;
}

/* The integer value of "key": N in a statistics JSON text, or -1. */
static inline long long stats_value(const char* json, const char* key) {
  char quoted[128];
  snprintf(quoted, sizeof quoted, "\"%s\": ", key);
  const char* at = strstr(json, quoted);
  return at ? atoll(at + strlen(quoted)) : -1;
}

static inline long long receiver_stat(kvw_receiver* r, const char* key) {
  static char json[1 << 16];
  if (kvw_receiver_stats_json(r, json, sizeof json, NULL) != KVW_OK) return -2;
  return stats_value(json, key);
}

static inline long long sender_stat(kvw_sender* s, const char* key) {
  static char json[1 << 16];
  if (kvw_sender_stats_json(s, json, sizeof json, NULL) != KVW_OK) return -2;
  return stats_value(json, key);
}

#endif /* KVWIRE_CAPI_TEST_H */
