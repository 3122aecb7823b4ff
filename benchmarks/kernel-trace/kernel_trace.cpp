// GPU time per CUDA kernel for any process, with no profiler installed: a CUPTI
// injection library. CUDA loads it into a process whose environment names it
// (CUDA_INJECTION64_PATH=.../libkernel-trace.so) and calls InitializeInjection when
// the process first initialises CUDA; from then on CUPTI records every kernel and
// copy the process runs (ONNX Runtime's, cuBLAS's) with device timestamps. At exit
// the records are summed by kernel name and written to $KERNEL_TRACE_OUT (stderr when
// unset): GPU time per kernel, the share of the GPU's busy time, and how busy the GPU
// was between the first and the last record.
//
// Why: ONNX Runtime's own profile times a CUDA node by the host launching it, so it
// cannot say which kernels take the GPU's time. Build: benchmarks/kernel-trace/build.sh.

#include <cupti.h>
#include <cxxabi.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr size_t kBufferBytes = 8u << 20;

struct KernelStats {
  uint64_t calls = 0;
  uint64_t nanos = 0;
};

struct CopyStats {
  uint64_t calls = 0;
  uint64_t bytes = 0;
  uint64_t nanos = 0;
};

std::mutex mutex;
std::map<std::string, KernelStats> kernels;
std::map<std::string, CopyStats> copies;
// Every record's interval, for the busy fraction (union of intervals).
std::vector<std::pair<uint64_t, uint64_t>> intervals;
bool reported = false;

std::string demangle(const char* name) {
  if (name == nullptr) return "?";
  int status = 0;
  char* plain = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && plain != nullptr ? plain : name;
  std::free(plain);
  // Template arguments make names unreadably long; keep the head.
  if (out.size() > 160) out = out.substr(0, 157) + "...";
  return out;
}

const char* copy_kind(uint8_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "copy host-to-device";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "copy device-to-host";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "copy device-to-device";
    default: return "copy (other)";
  }
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(mutex);
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL ||
        record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      auto* k = reinterpret_cast<CUpti_ActivityKernel10*>(record);
      // Packed records: copy the fields out before taking references.
      const uint64_t start = k->start, end = k->end;
      if (end <= start) continue;
      auto& s = kernels[demangle(k->name)];
      s.calls += 1;
      s.nanos += end - start;
      intervals.emplace_back(start, end);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      auto* m = reinterpret_cast<CUpti_ActivityMemcpy6*>(record);
      const uint64_t start = m->start, end = m->end;
      if (end <= start) continue;
      auto& s = copies[copy_kind(m->copyKind)];
      s.calls += 1;
      s.bytes += m->bytes;
      s.nanos += end - start;
      intervals.emplace_back(start, end);
    }
  }
  std::free(buffer);
}

void report() {
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  std::lock_guard<std::mutex> lock(mutex);
  if (reported) return;
  reported = true;
  const char* path = std::getenv("KERNEL_TRACE_OUT");
  FILE* out = path != nullptr ? std::fopen(path, "w") : stderr;
  if (out == nullptr) out = stderr;

  std::sort(intervals.begin(), intervals.end());
  uint64_t busy = 0, first = 0, last = 0, open_start = 0, open_end = 0;
  bool open = false;
  for (const auto& [start, end] : intervals) {
    if (!open) {
      first = start;
      open = true;
      open_start = start;
      open_end = end;
    } else if (start > open_end) {
      busy += open_end - open_start;
      open_start = start;
      open_end = end;
    } else {
      open_end = std::max(open_end, end);
    }
    last = std::max(last, end);
  }
  if (open) busy += open_end - open_start;
  const double span = static_cast<double>(last - first);

  uint64_t kernel_total = 0;
  for (const auto& [_, s] : kernels) kernel_total += s.nanos;
  std::fprintf(out, "# kernel-trace: %zu kernels, %zu records\n", kernels.size(), intervals.size());
  std::fprintf(out, "# span %.3f s, GPU busy %.3f s (%.1f%% of the span), kernel time %.3f s\n",
               span * 1e-9, busy * 1e-9, span > 0 ? 100.0 * busy / span : 0.0, kernel_total * 1e-9);
  std::fprintf(out, "share\ttotal_ms\tcalls\tmean_us\tname\n");
  std::vector<std::pair<std::string, KernelStats>> ranked(kernels.begin(), kernels.end());
  std::sort(ranked.begin(), ranked.end(),
            [](const auto& a, const auto& b) { return a.second.nanos > b.second.nanos; });
  const size_t top = std::getenv("KERNEL_TRACE_TOP") != nullptr
                         ? std::strtoul(std::getenv("KERNEL_TRACE_TOP"), nullptr, 10)
                         : 60;
  for (size_t i = 0; i < ranked.size() && i < top; ++i) {
    const auto& [name, s] = ranked[i];
    std::fprintf(out, "%.1f%%\t%.2f\t%llu\t%.1f\t%s\n",
                 kernel_total > 0 ? 100.0 * s.nanos / kernel_total : 0.0, s.nanos * 1e-6,
                 static_cast<unsigned long long>(s.calls), s.nanos * 1e-3 / s.calls, name.c_str());
  }
  for (const auto& [kind, s] : copies) {
    std::fprintf(out, "# %s: %llu calls, %.1f MB, %.2f ms\n", kind.c_str(),
                 static_cast<unsigned long long>(s.calls), s.bytes * 1e-6, s.nanos * 1e-6);
  }
  if (out != stderr) std::fclose(out);
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int InitializeInjection(void) {
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
    std::fprintf(stderr, "kernel-trace: CUPTI refused the activity callbacks\n");
    return 0;
  }
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  std::atexit(report);
  return 1;
}
