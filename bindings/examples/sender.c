/* A prefill-side program: stream one request's KV cache, layer by layer, to a receiver.
 *   cc sender.c $(pkg-config --cflags --libs kvwire) -o sender && ./sender 127.0.0.1:7400 */
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
    fprintf(stderr, "set KVWIRE_SECRET to the secret shared with the receiver\n");
    return 1;
  }
  check(kvw_init());

  kvw_layout layout = {sizeof(kvw_layout), LAYERS, HEADS, DIM, BS, KVW_FP32};
  kvw_tensor caches[LAYERS * 2];
  for (int i = 0; i < LAYERS * 2; ++i) {
    float* data = malloc(sizeof(float) * BLOCKS * BS * HEADS * DIM);
    for (long j = 0; j < (long)BLOCKS * BS * HEADS * DIM; ++j) data[j] = (float)(i + 1);
    kvw_tensor t = {sizeof(kvw_tensor), data, BLOCKS, {BS * HEADS * DIM, HEADS * DIM, DIM, 1}, -1};
    caches[i] = t;
  }

  kvw_sender* sender;
  check(kvw_sender_create(&layout, argc > 1 ? argv[1] : "127.0.0.1:7400", secret, caches,
                          LAYERS * 2, "streams=4,codec=raw", &sender));

  int blocks[] = {0, 1, 2}; /* our blocks holding the request's 40 tokens */
  kvw_transfer* transfer;
  check(kvw_transfer_begin(sender, "req-1", blocks, 3, 40, 60.0, &transfer));
  for (int layer = 0; layer < LAYERS; ++layer) {
    /* ... the prefill computes `layer` here ... */
    check(kvw_transfer_send_layer(transfer, layer, NULL)); /* returns at once */
  }
  check(kvw_transfer_finish(transfer, 30.0)); /* the receiver has every byte in place */
  printf("req-1 delivered\n");

  kvw_transfer_free(transfer);
  kvw_sender_close(sender);
  return 0;
}
