// Fused CPU copy-in/copy-out for FSDP communication buffers: one call per op for any number of
// tensors. Every op is a list of segments (src, dst, copy, total): copy `copy` elements (cast to
// the destination dtype) and zero-fill up to `total`. Segments are cut into pieces of at most
// kPiece elements and the pieces are spread over at::get_num_threads() threads, so 1000 small
// tensors cost one call, not 1000. Layout rules: fsdp_compile/kernels/_offsets.py.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kPiece = 1 << 16;        // elements per unit of parallel work
constexpr int64_t kSerialBytes = 2 << 20;  // below this, one thread (waking a helper costs ~30 us)

// Persistent helper threads (thread start-up costs ~60 us per call otherwise). Not
// at::parallel_for: its OpenMP body is inlined here and would need this file built with
// -fopenmp, i.e. a second OpenMP runtime next to torch's. Helpers sleep on a condition variable
// between calls (no spinning); one call at a time; a forked child builds its own pool.
class HelperPool {
 public:
  static HelperPool& get() {
    static std::mutex creation;
    static HelperPool* pool = nullptr;
    std::lock_guard<std::mutex> guard(creation);
    if (pool == nullptr || pool->pid_ != getpid()) {
      pool = new HelperPool();  // never deleted: helpers live until exit (a fork leaves the old one)
    }
    return *pool;
  }

  // work(0) runs here, work(1) .. work(threads - 1) on helpers; returns when all are done.
  void run(int64_t threads, const std::function<void(int64_t)>& work) {
    std::lock_guard<std::mutex> one_call(call_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int64_t>(helpers_.size()) < threads - 1) {
      const int64_t id = static_cast<int64_t>(helpers_.size()) + 1;
      helpers_.emplace_back([this, id] { loop(id); });
      helpers_.back().detach();
    }
    work_ = &work;
    active_ = threads - 1;
    pending_ = threads - 1;
    ++generation_;
    lock.unlock();
    wake_.notify_all();
    std::exception_ptr error;
    try {
      work(0);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    done_.wait(lock, [this] { return pending_ == 0; });
    work_ = nullptr;
    if (error) {
      std::rethrow_exception(error);
    }
  }

 private:
  HelperPool() : pid_(getpid()) {}

  void loop(int64_t id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (id > active_) {
        continue;
      }
      const auto* work = work_;
      lock.unlock();
      (*work)(id);  // cannot throw: dtypes are checked before any work starts (check_dtype)
      lock.lock();
      if (--pending_ == 0) {
        done_.notify_one();
      }
    }
  }

  const pid_t pid_;
  std::mutex call_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> helpers_;
  const std::function<void(int64_t)>* work_ = nullptr;
  int64_t active_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

struct Segment {
  const char* src;
  at::ScalarType src_type;
  char* dst;
  int64_t copy;   // elements read from src
  int64_t total;  // elements written to dst (copy, then zeros)
};

template <typename S, typename D>
void cast_copy(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(dst, src, n * sizeof(D));
  } else {
    for (int64_t k = 0; k < n; ++k) {
      dst[k] = static_cast<D>(src[k]);
    }
  }
}

// Elements [begin, end) of one segment.
void run_range(const Segment& s, at::ScalarType dst_type, int64_t begin, int64_t end) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst_type, "fsdp_copy_dst", [&] {
    using D = scalar_t;
    D* dst = reinterpret_cast<D*>(s.dst);
    const int64_t copy_end = std::min(end, s.copy);
    if (begin < copy_end) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.src_type, "fsdp_copy_src", [&] {
        cast_copy(reinterpret_cast<const scalar_t*>(s.src) + begin, dst + begin, copy_end - begin);
      });
    }
    const int64_t zero_begin = std::max(begin, s.copy);
    if (zero_begin < end) {
      std::memset(dst + zero_begin, 0, (end - zero_begin) * sizeof(D));
    }
  });
}

void run(const std::vector<Segment>& segments, at::ScalarType dst_type, int64_t dst_bytes) {
  // Pieces are runs of kPiece elements of the segments laid end to end: a piece may cover many
  // small segments (1000 tensors of 8K elements are 128 pieces, not 1000), and a large segment
  // spans many pieces.
  const int64_t num_segments = static_cast<int64_t>(segments.size());
  std::vector<int64_t> starts(num_segments + 1, 0);
  for (int64_t i = 0; i < num_segments; ++i) {
    starts[i + 1] = starts[i] + segments[i].total;
  }
  const int64_t total = starts.back();
  const int64_t n = (total + kPiece - 1) / kPiece;
  const int64_t threads = dst_bytes < kSerialBytes ? 1 : std::min<int64_t>(at::get_num_threads(), n);
  // Pieces are claimed one at a time, so the caller's thread keeps copying while a helper wakes.
  // Only raw pointers are touched from here on: other Python threads may run meanwhile.
  py::gil_scoped_release no_gil;
  std::atomic<int64_t> next{0};
  const std::function<void(int64_t)> work = [&](int64_t) {
    for (int64_t k = next++; k < n; k = next++) {
      const int64_t lo = k * kPiece, hi = std::min(lo + kPiece, total);
      // The last segment starting at or before lo (empty segments start where the next one does).
      int64_t i = std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin() - 1;
      for (; i < num_segments && starts[i] < hi; ++i) {
        const int64_t begin = std::max(lo, starts[i]) - starts[i], end = std::min(hi, starts[i + 1]) - starts[i];
        if (begin < end) {
          run_range(segments[i], dst_type, begin, end);
        }
      }
    }
  };
  if (threads <= 1) {
    work(0);
  } else {
    HelperPool::get().run(threads, work);
  }
}

// The tensors of a Python list or tuple, borrowed without at::Tensor reference-count traffic (a
// tuple of the items, held here, keeps them alive for the call). Inputs get a contiguous copy,
// owned here, where they are not contiguous; outputs are never copied (a copy would take the
// writes). Cheaper per tensor than converting to std::vector<at::Tensor>, which matters at 1000
// tensors.
class TensorList {
 public:
  enum Role { kInputs, kOutputs };

  TensorList(const py::handle& sequence, const char* op, Role role = kInputs) {
    // A tuple of our own: the copy runs without the GIL, and a list the caller's other threads
    // mutate meanwhile must not free a tensor we are reading.
    seq_ = py::reinterpret_steal<py::object>(PySequence_Tuple(sequence.ptr()));
    if (!seq_) {
      throw py::error_already_set();
    }
    const Py_ssize_t n = PyTuple_GET_SIZE(seq_.ptr());
    PyObject** items = &PyTuple_GET_ITEM(seq_.ptr(), 0);
    owned_.reserve(n);  // never reallocated: tensors_ points into it
    tensors_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      TORCH_CHECK_TYPE(THPVariable_Check(items[i]), op, ": item ", i, " is not a tensor");
      const at::Tensor& t = THPVariable_Unpack(items[i]);
      any_requires_grad_ = any_requires_grad_ || t.requires_grad();
      if (t.is_contiguous() || role == kOutputs) {  // the op itself rejects a non-contiguous output
        tensors_.push_back(&t);
      } else {
        owned_.push_back(t.contiguous());
        tensors_.push_back(&owned_.back());
      }
    }
  }
  explicit TensorList(const std::vector<at::Tensor>& tensors) {
    for (const auto& t : tensors) {
      tensors_.push_back(&t);
    }
  }
  size_t size() const { return tensors_.size(); }
  const at::Tensor& operator[](size_t i) const { return *tensors_[i]; }
  // True when autograd would record an op on these tensors: the caller must go through the
  // dispatcher (the op's autograd formula) instead of copying here.
  bool needs_autograd() const { return any_requires_grad_ && at::GradMode::is_enabled(); }

 private:
  bool any_requires_grad_ = false;
  py::object seq_;
  std::vector<at::Tensor> owned_;
  std::vector<const at::Tensor*> tensors_;
};

// A Python list or tuple of ints, read directly (pybind's generic caster costs ~25 ns per item).
std::vector<int64_t> int_list(const py::handle& sequence, const char* op) {
  py::object seq = py::reinterpret_steal<py::object>(PySequence_Fast(sequence.ptr(), op));
  if (!seq) {
    throw py::error_already_set();
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  std::vector<int64_t> out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[i] = PyLong_AsLongLong(items[i]);
    if (out[i] == -1 && PyErr_Occurred()) {
      throw py::error_already_set();
    }
  }
  return out;
}

void check_dtype(const at::Tensor& t, const char* op) {
  const auto type = t.scalar_type();
  TORCH_CHECK_VALUE(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, op,
                    ": floating-point tensors only (float32/float64/float16/bfloat16), got ", type);
}

const char* bytes(const at::Tensor& t) {
  return static_cast<const char*>(t.const_data_ptr());
}

void check_out(const at::Tensor& out, int64_t numel, const char* op) {
  TORCH_CHECK(out.is_contiguous() && out.device().is_cpu(), op, ": out must be a contiguous CPU tensor");
  TORCH_CHECK_VALUE(out.numel() == numel, op, ": out has ", out.numel(), " elements, the layout needs ", numel);
}

int64_t row_numel(const at::Tensor& t) {
  int64_t r = 1;
  for (int64_t d = 1; d < t.dim(); ++d) {
    r *= t.size(d);
  }
  return r;
}

}  // namespace

// shards[i] (any float dtype) -> out[off_i : off_i + padded[i]], zero padded, cast to out's dtype.
// With defer_if_grad, does nothing and returns false when autograd would record the op.
bool all_gather_copy_in(const py::handle& shards_in, const py::handle& padded_in, at::Tensor out, bool defer_if_grad) {
  const TensorList shards(shards_in, "all_gather_copy_in");
  if (defer_if_grad && shards.needs_autograd()) {
    return false;
  }
  const std::vector<int64_t> padded = int_list(padded_in, "all_gather_copy_in");
  TORCH_CHECK_VALUE(shards.size() == padded.size(), "all_gather_copy_in: one padded numel per shard");
  const int64_t esz = out.element_size();
  check_dtype(out, "all_gather_copy_in");
  std::vector<Segment> segments;
  int64_t off = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    TORCH_CHECK_VALUE(shards[i].numel() <= padded[i], "all_gather_copy_in: shard ", i, " has ", shards[i].numel(),
                " elements > padded numel ", padded[i]);
    check_dtype(shards[i], "all_gather_copy_in");
    segments.push_back({bytes(shards[i]), shards[i].scalar_type(), static_cast<char*>(out.data_ptr()) + off * esz,
                        shards[i].numel(), padded[i]});
    off += padded[i];
  }
  check_out(out, off, "all_gather_copy_in");
  run(segments, out.scalar_type(), off * esz);
  return true;
}

// Shapes packed as (flat dims, ndims), the custom-op schema's form.
std::vector<std::vector<int64_t>> unpack_shapes(const std::vector<int64_t>& flat, const std::vector<int64_t>& ndims) {
  std::vector<std::vector<int64_t>> shapes;
  size_t pos = 0;
  for (int64_t n : ndims) {
    TORCH_CHECK(n >= 1 && pos + n <= flat.size(), "all_gather_copy_out: bad packed shapes");
    shapes.emplace_back(flat.begin() + pos, flat.begin() + pos + n);
    pos += n;
  }
  TORCH_CHECK(pos == flat.size(), "all_gather_copy_out: bad packed shapes");
  return shapes;
}

// Rank-major gathered buffer (world * T) -> full tensors outs[i] (contiguous, gathered's dtype,
// of the packed shapes).
void all_gather_copy_out(const at::Tensor& gathered_in, const TensorList& outs, int64_t world,
                         const std::vector<int64_t>& flat_shapes, const std::vector<int64_t>& ndims) {
  const auto gathered = gathered_in.contiguous();
  check_dtype(gathered, "all_gather_copy_out");
  const auto shapes = unpack_shapes(flat_shapes, ndims);
  TORCH_CHECK_VALUE(shapes.size() == outs.size(), "all_gather_copy_out: ", outs.size(), " outputs for ", shapes.size(),
              " shapes");
  const int64_t esz = gathered.element_size();
  std::vector<int64_t> offs;
  int64_t total = 0;
  for (size_t i = 0; i < outs.size(); ++i) {
    const auto& o = outs[i];
    TORCH_CHECK_VALUE(o.sizes() == at::IntArrayRef(shapes[i]) && o.scalar_type() == gathered.scalar_type(),
                "all_gather_copy_out: out[", i, "] is ", o.sizes(), " ", o.scalar_type(), ", expected ",
                at::IntArrayRef(shapes[i]), " ", gathered.scalar_type());
    TORCH_CHECK_VALUE(o.is_contiguous() && o.device().is_cpu(), "all_gather_copy_out: out[", i,
                      "] must be a contiguous CPU tensor");
    offs.push_back(total);
    total += (o.size(0) + world - 1) / world * row_numel(o);
  }
  check_out(gathered, world * total, "all_gather_copy_out");
  std::vector<Segment> segments;
  for (size_t i = 0; i < outs.size(); ++i) {
    const int64_t dim0 = outs[i].size(0), c = (dim0 + world - 1) / world, rn = row_numel(outs[i]);
    for (int64_t r = 0; r < world; ++r) {
      const int64_t rows = std::max<int64_t>(0, std::min((r + 1) * c, dim0) - r * c);
      if (rows == 0) {
        continue;
      }
      segments.push_back({bytes(gathered) + (r * total + offs[i]) * esz, gathered.scalar_type(),
                          static_cast<char*>(outs[i].data_ptr()) + r * c * rn * esz, rows * rn, rows * rn});
    }
  }
  run(segments, gathered.scalar_type(), world * total * esz);
}

// New full tensors of the packed shapes, unpacked from the gathered buffer.
std::vector<at::Tensor> all_gather_copy_out_new(const at::Tensor& gathered, const std::vector<int64_t>& flat_shapes,
                                                const std::vector<int64_t>& ndims, int64_t world) {
  std::vector<at::Tensor> outs;
  for (const auto& shape : unpack_shapes(flat_shapes, ndims)) {
    outs.push_back(at::empty(shape, gathered.options()));
  }
  all_gather_copy_out(gathered, TensorList(outs), world, flat_shapes, ndims);
  return outs;
}

// Full gradients -> rank-major out (world * T): chunk r of every gradient (ceil(D/W) rows, zero
// padded) in rank r's slot, cast to out's dtype. The torch._chunk_cat layout. out is
// empty(world * T), a Python callable (the caller's buffer pool). With defer_if_grad, returns
// None without allocating when autograd would record the op.
py::object reduce_scatter_copy_in(const py::handle& grads_in, int64_t world, const py::function& empty,
                                  bool defer_if_grad) {
  const TensorList grads(grads_in, "reduce_scatter_copy_in");
  if (defer_if_grad && grads.needs_autograd()) {
    return py::none();
  }
  std::vector<int64_t> offs, padded;
  int64_t total = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.dim() >= 1, "reduce_scatter_copy_in: gradients must be at least 1-D");
    check_dtype(g, "reduce_scatter_copy_in");
    offs.push_back(total);
    padded.push_back((g.size(0) + world - 1) / world * row_numel(g));
    total += padded.back();
  }
  py::object out_object = empty(world * total);
  TORCH_CHECK_TYPE(THPVariable_Check(out_object.ptr()), "reduce_scatter_copy_in: empty() must return a tensor");
  const at::Tensor& out = THPVariable_Unpack(out_object.ptr());
  const int64_t esz = out.element_size();
  check_dtype(out, "reduce_scatter_copy_in");
  check_out(out, world * total, "reduce_scatter_copy_in");
  std::vector<Segment> segments;
  char* base = static_cast<char*>(out.data_ptr());
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t dim0 = grads[i].size(0), c = (dim0 + world - 1) / world, rn = row_numel(grads[i]);
    const int64_t gsz = grads[i].element_size();
    for (int64_t r = 0; r < world; ++r) {
      const int64_t rows = std::max<int64_t>(0, std::min((r + 1) * c, dim0) - r * c);
      segments.push_back({bytes(grads[i]) + (rows ? r * c * rn * gsz : 0), grads[i].scalar_type(),
                          base + (r * total + offs[i]) * esz, rows * rn, padded[i]});
    }
  }
  run(segments, out.scalar_type(), world * total * esz);
  return out_object;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("all_gather_copy_in", &all_gather_copy_in);
  m.def("all_gather_copy_out", [](const at::Tensor& gathered, const py::handle& outs, int64_t world,
                                  const py::handle& flat_shapes, const py::handle& ndims) {
    const char* op = "all_gather_copy_out";
    all_gather_copy_out(gathered, TensorList(outs, op, TensorList::kOutputs), world, int_list(flat_shapes, op),
                        int_list(ndims, op));
  });
  m.def("all_gather_copy_out_new", [](const at::Tensor& gathered, const py::handle& flat_shapes,
                                      const py::handle& ndims, int64_t world) {
    const char* op = "all_gather_copy_out";
    return all_gather_copy_out_new(gathered, int_list(flat_shapes, op), int_list(ndims, op), world);
  });
  m.def("reduce_scatter_copy_in", &reduce_scatter_copy_in);
}
