// ONNX Runtime custom-op library: domain "larp_rt", op "Sample" (CPU kernel always; the CUDA kernel on the CUDA
// execution provider's compute stream when built with LARP_RT_WITH_CUDA).
//
//   inputs   0 logits      [R, V] float / float16 / bfloat16; R = B, or 2B with the null-class (CFG) rows last
//            1 cfg_scale   [B] float        2 temperature [B] float     3 top_k [B] int64
//            4 top_p       [B] float        5 seed        [B] int64 (uint64 bit pattern)
//            6 stream      [B] int64        7 step        [] or [1] int64 (Philox counter high half, every row)
//                                                           or [B] int64 (one per row: rows at different steps)
//   outputs  0 tokens      [B] int64        1 logprobs    [B] double (optional)
//
// Semantics: larp_rt/sampling.py. Register with SessionOptions.register_custom_ops_library(path).
// Also op "DecodeAttention" (CPU): the one-token cache attention of the fused decode graph over a float32, float16
// or int8 (+ per-slot scales) cache, and op "PackedMatMul" (CPU): the decode step's projections against weights
// packed at export (below).
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#include "larp_rt/larp_sampling.h"

namespace {

const char* kDomain = "larp_rt";

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

[[noreturn]] void bad(const std::string& msg) { throw Ort::Exception("larp_rt.Sample: " + msg, ORT_INVALID_ARGUMENT); }

struct SampleKernel {
  explicit SampleKernel(bool cuda) : cuda_(cuda) {}

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    if (ctx.GetInputCount() != 8) bad("expects 8 inputs, got " + std::to_string(ctx.GetInputCount()));
    Ort::ConstValue logits = ctx.GetInput(0);
    const auto info = logits.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = info.GetShape();
    if (shape.size() != 2) bad("logits must have shape [R, V], got " + shape_str(shape));
    int32_t dtype;
    switch (info.GetElementType()) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: dtype = 0; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: dtype = 1; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: dtype = 2; break;
      default: bad("logits must be float, float16 or bfloat16");
    }
    static const char* names[8] = {"logits", "cfg_scale", "temperature", "top_k", "top_p", "seed", "stream", "step"};
    static const ONNXTensorElementDataType types[8] = {
        ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
        ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,     ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
        ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,     ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64};
    Ort::ConstValue cfg = ctx.GetInput(1);
    const int64_t B = cfg.GetTensorTypeAndShapeInfo().GetElementCount();
    const void* ptr[8] = {logits.GetTensorRawData()};
    bool step_per_row = false;
    for (int i = 1; i < 8; ++i) {
      Ort::ConstValue v = ctx.GetInput(i);
      const auto ti = v.GetTensorTypeAndShapeInfo();
      if (ti.GetElementType() != types[i]) bad(std::string(names[i]) + " has the wrong element type (see the op's doc)");
      const int64_t n = (int64_t)ti.GetElementCount();
      if (i < 7 && (ti.GetShape().size() != 1 || n != B))
        bad(std::string(names[i]) + " must have shape [B] = [" + std::to_string(B) + "], got " + shape_str(ti.GetShape()));
      if (i == 7) {  // [] / [1]: one step for every row; [B]: one per row (B = 1: either reads the same)
        const std::vector<int64_t> s = ti.GetShape();
        const bool shared = s.empty() || (s.size() == 1 && s[0] == 1);
        step_per_row = !shared && s.size() == 1 && s[0] == B;
        if (!shared && !step_per_row)
          bad("step must have shape [] or [1] (one step for every row) or [B] = [" + std::to_string(B) +
              "] (one per row), got " + shape_str(s));
      }
      ptr[i] = v.GetTensorRawData();
    }
    const int64_t R = shape[0], V = shape[1];
    if (R != B && R != 2 * B)
      bad("logits has " + std::to_string(R) + " rows for B = " + std::to_string(B) +
          " parameter rows: want B (no CFG) or 2B (cond rows, then null-class rows)");
    Ort::UnownedValue tokens = ctx.GetOutput(0, std::vector<int64_t>{B});
    double* logprobs = nullptr;
    if (ctx.GetOutputCount() > 1) {
      Ort::UnownedValue lp = ctx.GetOutput(1, std::vector<int64_t>{B});
      if (lp) logprobs = lp.GetTensorMutableData<double>();
    }
    if (B == 0) return;
    larp_sample_args a{};
    const size_t esize = dtype == 0 ? 4 : 2;
    a.cond = ptr[0];
    a.uncond = R == 2 * B ? static_cast<const char*>(ptr[0]) + (size_t)(B * V) * esize : nullptr;
    a.ld_cond = V;
    a.ld_uncond = V;
    a.dtype = dtype;
    a.num_threads = 1;
    a.batch = B;
    a.vocab = V;
    a.cfg_scale = static_cast<const float*>(ptr[1]);
    a.temperature = static_cast<const float*>(ptr[2]);
    a.top_k = static_cast<const int64_t*>(ptr[3]);
    a.top_p = static_cast<const float*>(ptr[4]);
    a.seed = static_cast<const uint64_t*>(ptr[5]);
    a.stream = static_cast<const uint64_t*>(ptr[6]);
    if (step_per_row)
      a.steps = static_cast<const int64_t*>(ptr[7]);
    else
      a.step_ptr = static_cast<const int64_t*>(ptr[7]);
    a.tokens = tokens.GetTensorMutableData<int64_t>();
    a.logprobs = logprobs;
#ifdef LARP_RT_WITH_CUDA
    if (cuda_) {
      if (larp_sample_cuda(&a, ctx.GetGPUComputeStream()) != 0) bad(larp_cuda_last_error());
      return;
    }
#endif
    if (larp_sample_cpu(&a) != 0) bad(larp_last_error());
  }

  bool cuda_;
};

struct SampleOp : Ort::CustomOpBase<SampleOp, SampleKernel> {
  explicit SampleOp(bool cuda) : cuda_(cuda) {}
  void* CreateKernel(const OrtApi& /*api*/, const OrtKernelInfo* /*info*/) const { return new SampleKernel(cuda_); }
  const char* GetName() const { return "Sample"; }
  const char* GetExecutionProviderType() const { return cuda_ ? "CUDAExecutionProvider" : "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float / float16 / bfloat16, checked at run time
      case 3: case 5: case 6: case 7: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 0 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
                  : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL;
  }
  bool cuda_;
};

// ---- DecodeAttention: one-token attention against the static cache (include/larp_rt/attention_cpu.h) ----
//   inputs   0 q [B, H, 1, hd] float (pre-scaled)   1 k [B, H, 1, hd]   2 v [B, H, 1, hd]
//            3 past_k [B, H, S, hd]   4 past_v [B, H, S, hd]: float, float16, or int8 (then inputs 6 and 7)
//            5 pos [1] int64 (one position for every row) or [B] int64 (one per row): row b reads its slots
//              < pos[b] (clamped to [0, S])
//            6 k_scale [B, H, S] float, 7 v_scale [B, H, S] float: int8 caches only (slot j = scale_j * int8 row)
//   outputs  0 y [B, H, 1, hd] float
struct AttentionWork {
  const float *q, *k, *v;
  const void *pk, *pv;
  const float *ks, *vs;
  float* y;
  const int64_t* pos;  // [B]
  int64_t H, S, hd, tasks;
  int32_t kv;  // 0 float, 1 float16, 2 int8
};

// One unit of ParallelFor = two (row, head) tasks, read side by side (see attention_cpu.h).
void attention_unit(void* data, size_t unit) {
  const AttentionWork* w = static_cast<const AttentionWork*>(data);
  const int64_t t0 = 2 * (int64_t)unit, t1 = std::min(t0 + 2, w->tasks);
  larp_decode_attention_kv_tasks(w->q, w->k, w->v, w->pk, w->pv, w->ks, w->vs, w->y, w->H, w->S, w->hd, w->pos,
                                 w->kv, t0, t1);
}

[[noreturn]] void bad_attn(const std::string& msg) {
  throw Ort::Exception("larp_rt.DecodeAttention: " + msg, ORT_INVALID_ARGUMENT);
}

struct AttentionKernel {
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    const size_t n_in = ctx.GetInputCount();
    if (n_in != 6 && n_in != 8) bad_attn("expects 6 inputs (8 with an int8 cache), got " + std::to_string(n_in));
    Ort::ConstValue q = ctx.GetInput(0), k = ctx.GetInput(1), v = ctx.GetInput(2);
    Ort::ConstValue pk = ctx.GetInput(3), pv = ctx.GetInput(4), pos = ctx.GetInput(5);
    const std::vector<int64_t> qs = q.GetTensorTypeAndShapeInfo().GetShape();
    const auto ci = pk.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> cs = ci.GetShape();
    if (qs.size() != 4 || qs[2] != 1) bad_attn("q must have shape [B, H, 1, hd], got " + shape_str(qs));
    if (k.GetTensorTypeAndShapeInfo().GetShape() != qs || v.GetTensorTypeAndShapeInfo().GetShape() != qs)
      bad_attn("k and v must have q's shape " + shape_str(qs));
    if (cs.size() != 4 || cs[0] != qs[0] || cs[1] != qs[1] || cs[3] != qs[3])
      bad_attn("past_k must have shape [B, H, S, hd] = [" + std::to_string(qs[0]) + ", " + std::to_string(qs[1]) +
               ", S, " + std::to_string(qs[3]) + "], got " + shape_str(cs));
    const auto vi = pv.GetTensorTypeAndShapeInfo();
    if (vi.GetShape() != cs) bad_attn("past_v must have past_k's shape " + shape_str(cs));
    int32_t kv;
    switch (ci.GetElementType()) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: kv = 0; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: kv = 1; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: kv = 2; break;
      default: bad_attn("past_k must be float, float16 or int8");
    }
    if (vi.GetElementType() != ci.GetElementType()) bad_attn("past_v must have past_k's element type");
    if ((kv == 2) != (n_in == 8))
      bad_attn(kv == 2 ? "an int8 cache needs k_scale and v_scale [B, H, S] (inputs 6 and 7)"
                       : "k_scale and v_scale are for int8 caches; this cache is " +
                             std::string(kv == 0 ? "float" : "float16"));
    const float *ks = nullptr, *vs = nullptr;
    if (kv == 2) {
      Ort::ConstValue kq = ctx.GetInput(6), vq = ctx.GetInput(7);
      const std::vector<int64_t> want{cs[0], cs[1], cs[2]};
      if (kq.GetTensorTypeAndShapeInfo().GetShape() != want || vq.GetTensorTypeAndShapeInfo().GetShape() != want)
        bad_attn("k_scale and v_scale must have shape [B, H, S] = " + shape_str(want));
      ks = kq.GetTensorData<float>();
      vs = vq.GetTensorData<float>();
    }
    const std::vector<int64_t> ps = pos.GetTensorTypeAndShapeInfo().GetShape();
    const int64_t B = qs[0];
    if (ps.size() != 1 || (ps[0] != 1 && ps[0] != B))
      bad_attn("pos must have shape [1] (one position for every row) or [B] = [" + std::to_string(B) +
               "] (one per row), got " + shape_str(ps));
    const int64_t* p = pos.GetTensorData<int64_t>();
    std::vector<int64_t> shared;  // [1] with B > 1: the kernel reads one entry per row
    if (ps[0] != B) {
      shared.assign((size_t)B, p[0]);
      p = shared.data();
    }
    AttentionWork w{q.GetTensorData<float>(), k.GetTensorData<float>(), v.GetTensorData<float>(),
                    pk.GetTensorRawData(), pv.GetTensorRawData(), ks, vs, nullptr, p, qs[1], cs[2], qs[3],
                    B * qs[1], kv};
    w.y = ctx.GetOutput(0, qs).GetTensorMutableData<float>();
    if (w.tasks == 0) return;
    ctx.ParallelFor(attention_unit, (size_t)(w.tasks + 1) / 2, 0, &w);  // ONNX Runtime's intra-op threads
  }
};

struct AttentionOp : Ort::CustomOpBase<AttentionOp, AttentionKernel> {
  void* CreateKernel(const OrtApi& /*api*/, const OrtKernelInfo* /*info*/) const { return new AttentionKernel(); }
  const char* GetName() const { return "DecodeAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 3: case 4: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float / float16 / int8, checked at run time
      case 5: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 6 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
                 : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*i*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// Op "PackedMatMul" (CPU): Y = X @ W for the few rows of a decode step, W packed in 32-column panels at export
// (include/larp_rt/matmul_cpu.h; export/sampler_graph.py writes it in the fused graph of float32 bundles).
//   inputs   0 X [..., K] float   1 P [ceil(N / 32), K, 32] float (an initializer: W's panels, zero past N)
//   attribute n (int): N, the columns of W
//   outputs  0 Y [..., N] float
struct MatMulWork {
  const float *x, *p;
  float* y;
  int64_t m, k, n;
};

void matmul_unit(void* data, size_t unit) {  // one unit = one panel of every row
  const MatMulWork* w = static_cast<const MatMulWork*>(data);
  larp_packed_matmul_panels(w->x, w->p, w->y, w->m, w->k, w->n, (int64_t)unit, (int64_t)unit + 1, -1);
}

[[noreturn]] void bad_mm(const std::string& msg) {
  throw Ort::Exception("larp_rt.PackedMatMul: " + msg, ORT_INVALID_ARGUMENT);
}

struct PackedMatMulKernel {
  explicit PackedMatMulKernel(int64_t n) : n_(n) {}

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    Ort::ConstValue x = ctx.GetInput(0), p = ctx.GetInput(1);
    std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> ps = p.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.empty()) bad_mm("X must have at least one axis [..., K], got a scalar");
    const int64_t K = xs.back();
    if (ps.size() != 3 || ps[1] != K || ps[2] != 32 || ps[0] != (n_ + 31) / 32)
      bad_mm("P must have shape [ceil(n / 32), K, 32] = [" + std::to_string((n_ + 31) / 32) + ", " +
             std::to_string(K) + ", 32] for n = " + std::to_string(n_) + ", got " + shape_str(ps));
    int64_t M = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) M *= xs[i];
    xs.back() = n_;
    MatMulWork w{x.GetTensorData<float>(), p.GetTensorData<float>(), nullptr, M, K, n_};
    w.y = ctx.GetOutput(0, xs).GetTensorMutableData<float>();
    if (M == 0 || n_ == 0) return;
    ctx.ParallelFor(matmul_unit, (size_t)ps[0], 0, &w);  // ONNX Runtime's intra-op threads, a panel each
  }

 private:
  int64_t n_;
};

struct PackedMatMulOp : Ort::CustomOpBase<PackedMatMulOp, PackedMatMulKernel> {
  void* CreateKernel(const OrtApi& /*api*/, const OrtKernelInfo* info) const {
    const int64_t n = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("n");
    if (n < 1) bad_mm("attribute n must be >= 1, got " + std::to_string(n));
    return new PackedMatMulKernel(n);
  }
  const char* GetName() const { return "PackedMatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t /*i*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*i*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

std::mutex g_mu;
std::vector<OrtCustomOpDomain*> g_domains;  // must outlive every session that uses them: kept for the process

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                           const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {  // the runtime is older than the vendored headers: report it through the version-1 API
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "the larp_rt custom-op library needs onnxruntime >= 1.21");
  }
  Ort::InitApi(api);
  static SampleOp cpu_op(false);
  static AttentionOp attention_op;
  static PackedMatMulOp matmul_op;
#ifdef LARP_RT_WITH_CUDA
  static SampleOp cuda_op(true);
#endif
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &cpu_op)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &attention_op)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &matmul_op)) return st;
#ifdef LARP_RT_WITH_CUDA
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &cuda_op)) return st;
#endif
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_domains.push_back(domain);
  }
  return api->AddCustomOpDomain(options, domain);
}
