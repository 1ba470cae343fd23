// The output pool of output_pool.h: a c10::Allocator whose deleter keeps freed buffers.
#include "output_pool.h"

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "ops.h"

namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kKeptBuffers = 32;
// Outputs of a huge page or more come from the pool, and it keeps every size it hands out. Neither
// rule it had before holds up: (1) buffers up to 32 MiB went back to malloc on the theory that glibc
// keeps such blocks in its heap, but a 2 MiB-aligned request is one it maps afresh and unmaps on every
// free (a 4 / 8 / 16 MiB output written once: 6.4 / 12.8 / 2.9 ms, against 0.1 / 0.2 / 0.4 ms reused);
// (2) taking them from at::empty instead still left glibc trimming its heap under the loss's pattern
// of frees: 5 000 to 16 000 page faults a CamVid or Pascal VOC step. Kept, they cost none and no peak
// rises (the high-water rule of fresh()). A CKA loss step, processes alternating with the rule before
// (2-core Xeon, 2026-12-08): CamVid 74.6-79.5 -> 71.0-72.0 ms, Pascal VOC 155.7-160.7 -> 148.8-152.5 ms,
// Cityscapes within noise; the process's peak resident memory 756 -> 749 and 833 -> 808 MiB; the
// benchmarks' peak of one step from an empty pool 33.0 -> 33.5, 65.3 -> 65.6 and 129.7 -> 129.6 MiB.
constexpr size_t kPooledBytes = kHugePage;
// The bytes kept: 192 MiB unless CSKD_OUTPUT_CACHE_MB says otherwise. A CKA step at the released
// Cityscapes shapes takes five 32 MiB outputs (the student's kept O and A X, dOut, two gradients):
// keeping two (the limit was 64 MiB until 2026-12-08) mapped three afresh every step, about 50 huge-page
// faults; keeping them all took the step 311-330 -> 299-300 ms with the process's peak unchanged
// (926-928 MiB, the high-water rule), 64 MiB more resident between steps (2-core Xeon).
size_t kept_bytes_limit() {
  static const size_t limit = [] {
    const char* setting = std::getenv("CSKD_OUTPUT_CACHE_MB");
    if (setting == nullptr || *setting == '\0') return size_t{192} << 20;
    char* end = nullptr;
    const unsigned long long megabytes = std::strtoull(setting, &end, 10);
    TORCH_CHECK(*end == '\0', "CSKD_OUTPUT_CACHE_MB must be a whole number of MiB, got '", setting, "'");
    return static_cast<size_t>(megabytes) << 20;
  }();
  return limit;
}

class OutputPool final : public c10::Allocator {
 public:
  // Never destroyed: tensors from the pool may be freed during interpreter exit.
  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

  c10::DataPtr allocate(size_t bytes) override {
    kept_bytes_limit();  // read (and checked) here, where an error can reach Python, not in the deleter
    const size_t size = (std::max(bytes, size_t{1}) + kHugePage - 1) / kHugePage * kHugePage;
    void* data = take(size);
    if (data == nullptr) data = fresh(size);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ += size;
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void empty_cache() {
    std::vector<void*> kept;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      kept.swap(free_);
      for (void* data : kept) sizes_.erase(data);
      kept_bytes_ = 0;
      high_water_bytes_ = live_bytes_;  // the peak that later keeping may reach starts again from here
    }
    for (void* data : kept) std::free(data);
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  size_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return kept_bytes_;
  }
  size_t live_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return live_bytes_;
  }

 private:
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < free_.size(); ++i) {
      if (sizes_[free_[i]] == size) {
        void* data = free_[i];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        kept_bytes_ -= size;
        return data;
      }
    }
    return nullptr;
  }

  // A new mapping: kept buffers that would take the pool past the most its tensors have held at once
  // (live, this one included) are freed first, so that what it keeps never raises the peak.
  void* fresh(size_t size) {
    std::vector<void*> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      high_water_bytes_ = std::max(high_water_bytes_, live_bytes_ + size);
      while (!free_.empty() && live_bytes_ + size + kept_bytes_ > high_water_bytes_) {
        dropped.push_back(free_.front());
        kept_bytes_ -= sizes_[free_.front()];
        sizes_.erase(free_.front());
        free_.erase(free_.begin());
      }
    }
    for (void* d : dropped) std::free(d);
    void* data = std::aligned_alloc(kHugePage, size);
    TORCH_CHECK(data != nullptr, "cskd: cannot allocate ", size, " bytes for an output");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, size, MADV_HUGEPAGE);  // before the first touch; refused or unsupported changes nothing
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    sizes_[data] = size;
    return data;
  }

  // Keeps the freed buffer, dropping the oldest kept ones past the limits.
  static void release(void* data) {
    OutputPool& pool = instance();
    std::vector<void*> dropped;
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      const size_t size = pool.sizes_[data];
      pool.live_bytes_ -= size;
      if (size > kept_bytes_limit()) {
        dropped.push_back(data);
      } else {
        pool.free_.push_back(data);
        pool.kept_bytes_ += size;
      }
      while (pool.free_.size() > kKeptBuffers || pool.kept_bytes_ > kept_bytes_limit()) {
        dropped.push_back(pool.free_.front());
        pool.kept_bytes_ -= pool.sizes_[pool.free_.front()];
        pool.free_.erase(pool.free_.begin());
      }
      for (void* d : dropped) pool.sizes_.erase(d);
    }
    for (void* d : dropped) std::free(d);
  }

  std::mutex mutex_;
  std::unordered_map<void*, size_t> sizes_;  // every buffer of the pool, in use or kept
  std::vector<void*> free_;                  // kept buffers, oldest first
  size_t kept_bytes_ = 0;
  size_t live_bytes_ = 0;        // buffers of live tensors
  size_t high_water_bytes_ = 0;  // the most live_bytes_ has been
};

}  // namespace

at::Tensor cskd::empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "cskd::empty_output: CPU tensors only");
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kPooledBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &OutputPool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), at::MemoryFormat::Contiguous);
}

void cskd::empty_output_cache() { OutputPool::instance().empty_cache(); }

void register_output_pool(pybind11::module& m) {
  m.def(
      "empty_output",
      [](const std::vector<int64_t>& sizes, const at::Tensor& like) { return cskd::empty_output(sizes, like.options()); },
      "An empty contiguous CPU tensor of `sizes` in like's dtype, from the pool from 2 MiB (for the Python ops'\n"
      "map-sized results: the pool's buffers are kept for the next call, in huge pages).");
  m.def("empty_cache", &cskd::empty_output_cache,
        "Frees the output buffers the C++ kernels keep for reuse (as torch.cuda.empty_cache does); what it keeps\n"
        "later may again reach the most its live outputs hold from now on.");
  m.def("output_cache_bytes", [] { return OutputPool::instance().kept_bytes(); },
        "Bytes of the freed output buffers the pool keeps for reuse now.");
  m.def("output_pool_live_bytes", [] { return OutputPool::instance().live_bytes(); },
        "Bytes of the pool's buffers that live tensors hold now.");
}
