// The TensorRT backend's own device kernels: KV-cache slot writes, the next step's tokens fed on the device and
// the sampled rows' logits gathered for the sampling kernel. Compiled at run time with NVRTC for the GPU at hand
// (larp_rt/backends/tensorrt/device.py: compile_ptx, KVKernels; shipped as package data), launched by runner.py.
// row r's new cache entries (present: rows x h x hd) into slot pos[r] of its cache (rows x h x W x hd), for every
// layer and tensor at once (blockIdx.y picks the pair); elements are copied as raw bits of ESIZE bytes
template <typename T>
__device__ void kv_write_t(T* cache, const T* present, const long long* pos, int rows, int H, int W, int hd) {
  long long n = (long long)rows * H * hd;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    long long d = i % hd, rh = i / hd, r = rh / H;
    long long p = pos[r];
    if (p >= 0 && p < W) cache[(rh * W + p) * hd + d] = present[i];
  }
}
extern "C" __global__ void kv_write2(unsigned long long const* caches, unsigned long long const* presents,
                                     const long long* pos, int rows, int H, int W, int hd) {
  kv_write_t((unsigned short*)caches[blockIdx.y], (const unsigned short*)presents[blockIdx.y], pos, rows, H, W, hd);
}
extern "C" __global__ void kv_write4(unsigned long long const* caches, unsigned long long const* presents,
                                     const long long* pos, int rows, int H, int W, int hd) {
  kv_write_t((unsigned int*)caches[blockIdx.y], (const unsigned int*)presents[blockIdx.y], pos, rows, H, W, hd);
}
// the next step's input on the device: row r's token is what its request drew (row_req[r] < 0: an idle row, 0)
extern "C" __global__ void feed_tokens(long long* token, const long long* sampled, const long long* row_req, int cap) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cap; i += gridDim.x * blockDim.x) {
    long long q = row_req[i];
    long long t = q >= 0 ? sampled[q] : 0;
    token[i] = t >= 0 ? t : 0;  // a failed row (-1) feeds 0; the host reports the failure after the chunk
  }
}
// dst[i] = src[rows[i]] (V floats per row): the sampled rows' logits, contiguous for the sampling kernel
extern "C" __global__ void gather_rows(float* dst, const float* src, const long long* rows, int R, int V) {
  long long n = (long long)R * V;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    dst[i] = src[rows[i / V] * (long long)V + i % V];
}
