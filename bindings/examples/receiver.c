/* A decode-side program: receive one request's KV cache into its own blocks.
 *   cc receiver.c $(pkg-config --cflags --libs kvwire) -o receiver && ./receiver 7400 */
#include <stdio.h>
#include <stdlib.h>

#include "kvwire.h"

#define LAYERS 2
#define HEADS 2
#define DIM 64
#define BS 16
#define BLOCKS 32

static int check(int status) {
  if (status != KVW_OK) {
    fprintf(stderr, "kvwire: %s: %s\n", kvw_strerror(status), kvw_last_error());
    exit(1);
  }
  return status;
}

int main(int argc, char** argv) {
  /* The shared secret: at least 8 bytes, the same on both sides; never pass NULL. */
  const char* secret = getenv("KVWIRE_SECRET");
  if (!secret) {
    fprintf(stderr, "set KVWIRE_SECRET to the secret shared with the sender\n");
    return 1;
  }
  check(kvw_init()); /* starts the embedded runtime: do it once, early */

  /* Our paged cache: for each layer a k and a v tensor of [BLOCKS, BS, HEADS, DIM] floats. */
  kvw_layout layout = {sizeof(kvw_layout), LAYERS, HEADS, DIM, BS, KVW_FP32};
  kvw_tensor caches[LAYERS * 2];
  for (int i = 0; i < LAYERS * 2; ++i) {
    kvw_tensor t = {sizeof(kvw_tensor), calloc(BLOCKS * BS * HEADS * DIM, sizeof(float)), BLOCKS, {BS * HEADS * DIM, HEADS * DIM, DIM, 1}, -1};
    caches[i] = t;
  }

  char listen[64];
  snprintf(listen, sizeof listen, "0.0.0.0:%s", argc > 1 ? argv[1] : "7400");
  kvw_receiver* receiver;
  check(kvw_receiver_create(&layout, listen, secret, caches, LAYERS * 2, NULL, &receiver));

  /* Request "req-1": 40 tokens into our blocks 5, 6 and 9 (the last one partly filled). */
  int blocks[] = {5, 6, 9};
  kvw_request* request;
  check(kvw_expect(receiver, "req-1", blocks, 3, 40, 60.0, &request));
  check(kvw_request_wait_layer(request, 0, -1)); /* layer 0 is usable now */
  check(kvw_request_wait(request, -1));          /* and now every layer */
  printf("req-1 arrived; k[0] of its first token: %g\n", ((float*)caches[0].data)[5 * BS * HEADS * DIM]);

  kvw_request_free(request);
  kvw_receiver_close(receiver);
  return 0;
}
