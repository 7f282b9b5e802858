/* A C program that knows kvwire only through its installed header and pkg-config:
 * checks the versions, then moves one request between a receiver and a sender of its own. */
#include <kvwire.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LAYERS 2
#define ELEMS (8 * 16 * 2 * 32) /* 8 blocks of 16 tokens, 2 heads of 32 */

static int ok(int status, const char* what) {
  if (status != KVW_OK) fprintf(stderr, "consumer.c: %s: %s: %s\n", what, kvw_strerror(status), kvw_last_error());
  return status == KVW_OK;
}

int main(void) {
  if (kvw_version_number() != KVW_VERSION_NUMBER) {
    fprintf(stderr, "consumer.c: library %d, header %d\n", kvw_version_number(), KVW_VERSION_NUMBER);
    return 1;
  }
  if (!ok(kvw_init(), "kvw_init")) return 1;
  kvw_layout layout = {sizeof(kvw_layout), LAYERS, 2, 32, 16, KVW_FP16};
  static unsigned short src[LAYERS * 2][ELEMS], dst[LAYERS * 2][ELEMS];
  kvw_tensor from[LAYERS * 2], to[LAYERS * 2];
  for (int t = 0; t < LAYERS * 2; ++t) {
    for (int i = 0; i < ELEMS; ++i) src[t][i] = (unsigned short)(0x3c00 + (i * 7 + t) % 512);
    kvw_tensor a = {sizeof(kvw_tensor), src[t], 8, {16 * 2 * 32, 2 * 32, 32, 1}, -1};
    kvw_tensor b = {sizeof(kvw_tensor), dst[t], 8, {16 * 2 * 32, 2 * 32, 32, 1}, -1};
    from[t] = a, to[t] = b;
  }
  const char* secret = "consumer-c-secret";
  kvw_receiver* rx = NULL;
  kvw_sender* tx = NULL;
  kvw_request* rq = NULL;
  kvw_transfer* tr = NULL;
  int port = 0;
  char peer[64];
  if (!ok(kvw_receiver_create(&layout, "127.0.0.1:0", secret, to, LAYERS * 2, NULL, &rx), "receiver") ||
      !ok(kvw_receiver_port(rx, &port), "port"))
    return 1;
  snprintf(peer, sizeof peer, "127.0.0.1:%d", port);
  if (!ok(kvw_sender_create(&layout, peer, secret, from, LAYERS * 2, "streams=2", &tx), "sender") ||
      !ok(kvw_expect(rx, "c", (int[]){5, 2}, 2, 20, 30.0, &rq), "expect") ||
      !ok(kvw_transfer_begin(tx, "c", (int[]){0, 1}, 2, 20, 30.0, &tr), "begin"))
    return 1;
  for (int layer = 0; layer < LAYERS; ++layer)
    if (!ok(kvw_transfer_send_layer(tr, layer, NULL), "send_layer")) return 1;
  if (!ok(kvw_transfer_finish(tr, 30.0), "finish") || !ok(kvw_request_wait(rq, 30.0), "wait")) return 1;
  for (int t = 0; t < LAYERS * 2; ++t)
    if (memcmp(&dst[t][5 * 16 * 64], &src[t][0], 16 * 64 * 2) || memcmp(&dst[t][2 * 16 * 64], &src[t][16 * 64], 4 * 64 * 2)) {
      fprintf(stderr, "consumer.c: tensor %d differs\n", t);
      return 1;
    }
  kvw_transfer_free(tr);
  kvw_request_free(rq);
  kvw_sender_close(tx);
  kvw_receiver_close(rx);
  printf("consumer.c: kvwire %s, one request moved\n", kvw_version());
  return 0;
}
