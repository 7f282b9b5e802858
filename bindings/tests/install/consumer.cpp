// A C++ program that knows kvwire only through its installed header and pkg-config, built
// with -Wall -Wextra -Wpedantic -Werror: owns the handles with unique_ptr, polls a transfer.
#include <kvwire.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

void check(int status, const char* what) {
  if (status != KVW_OK) throw std::runtime_error(std::string(what) + ": " + kvw_strerror(status) + ": " + kvw_last_error());
}

struct SenderClose { void operator()(kvw_sender* s) const { kvw_sender_close(s); } };
struct ReceiverClose { void operator()(kvw_receiver* r) const { kvw_receiver_close(r); } };
struct TransferFree { void operator()(kvw_transfer* t) const { kvw_transfer_free(t); } };
struct RequestFree { void operator()(kvw_request* q) const { kvw_request_free(q); } };

constexpr int kLayers = 3, kBlocks = 6, kBlockSize = 8, kLatent = 48;  // MLA: one kv tensor per layer

std::vector<kvw_tensor> describe(std::vector<std::vector<float>>& caches) {
  std::vector<kvw_tensor> out;
  for (auto& c : caches) {
    kvw_tensor t{};
    t.struct_size = sizeof(kvw_tensor);
    t.data = c.data();
    t.num_blocks = kBlocks;
    t.strides[0] = kBlockSize * kLatent;
    t.strides[1] = kLatent;
    t.strides[3] = 1;
    t.device = -1;
    out.push_back(t);
  }
  return out;
}

}  // namespace

int main() {
  try {
    if (kvw_version_number() != KVW_VERSION_NUMBER) throw std::runtime_error("library and header versions differ");
    check(kvw_init(), "kvw_init");
    kvw_layout layout{};
    layout.struct_size = sizeof(kvw_layout);
    layout.num_layers = kLayers;
    layout.num_kv_heads = 0;
    layout.head_dim = kLatent;
    layout.block_size = kBlockSize;
    layout.dtype = KVW_FP32;
    std::vector<std::vector<float>> src(kLayers, std::vector<float>(kBlocks * kBlockSize * kLatent));
    std::vector<std::vector<float>> dst(kLayers, std::vector<float>(kBlocks * kBlockSize * kLatent, 0.0f));
    for (int l = 0; l < kLayers; ++l)
      for (std::size_t i = 0; i < src[l].size(); ++i) src[l][i] = static_cast<float>(l * 1000 + static_cast<int>(i % 997));
    auto from = describe(src), to = describe(dst);
    const char* secret = "consumer-cpp-secret";

    kvw_receiver* r = nullptr;
    check(kvw_receiver_create(&layout, "127.0.0.1:0", secret, to.data(), kLayers, "", &r), "receiver");
    std::unique_ptr<kvw_receiver, ReceiverClose> receiver(r);
    int port = 0;
    check(kvw_receiver_port(receiver.get(), &port), "port");
    const std::string peer = "127.0.0.1:" + std::to_string(port);
    kvw_sender* s = nullptr;
    check(kvw_sender_create(&layout, peer.c_str(), secret, from.data(), kLayers, "streams=1", &s), "sender");
    std::unique_ptr<kvw_sender, SenderClose> sender(s);

    const int src_blocks[] = {1, 2}, dst_blocks[] = {4, 0};
    kvw_request* q = nullptr;
    check(kvw_expect(receiver.get(), "cpp", dst_blocks, 2, 12, 30.0, &q), "expect");
    std::unique_ptr<kvw_request, RequestFree> request(q);
    kvw_transfer* t = nullptr;
    check(kvw_transfer_begin(sender.get(), "cpp", src_blocks, 2, 12, 30.0, &t), "begin");
    std::unique_ptr<kvw_transfer, TransferFree> transfer(t);
    for (int l = 0; l < kLayers; ++l) check(kvw_transfer_send_layer(transfer.get(), l, nullptr), "send_layer");
    int status;
    while ((status = kvw_transfer_poll(transfer.get())) == KVW_PENDING) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    check(status, "poll");
    check(kvw_request_wait(request.get(), 30.0), "wait");
    for (int l = 0; l < kLayers; ++l) {
      const std::size_t block = kBlockSize * kLatent;
      if (std::memcmp(&dst[l][4 * block], &src[l][1 * block], block * sizeof(float)) != 0 ||
          std::memcmp(&dst[l][0], &src[l][2 * block], 4 * kLatent * sizeof(float)) != 0)
        throw std::runtime_error("layer " + std::to_string(l) + " differs");
    }
    std::printf("consumer.cpp: kvwire %s, one MLA request moved\n", kvw_version());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer.cpp: %s\n", e.what());
    return 1;
  }
}
