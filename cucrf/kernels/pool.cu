// pool.cu -- ConvCRF blur pooling: average of the real pixels of each blur x blur cell.
//
// Self-contained (NVRTC and nvcc, no host headers). Template arguments:
//   T   float or double
//   NS  0: o0 = Pool(x)
//       2: o0 = Pool(x * s0), o1 = Pool(x * s1)   (symmetric normalisation: one pass, two outputs)
//
// x (B, C, H, W) -> o (B, C, h, w), h = ceil(H / blur). Cell (cy, cx) covers the padded rows
// [cy * blur, cy * blur + blur) i.e. the real rows [cy * blur - pad_y, ... + blur) clipped to
// [0, H) (ConvCRF: pad_y = ceil(((blur - H % blur) % blur) / 2), count_include_pad = False); the
// same for columns. s0, s1 (B, 1, H, W) are per-pixel factors shared by all channels.
// With blur = 1 the kernel is the identity (NS = 0) or the products x * s (NS = 2).
//
// Launch: 1-D, one thread per output element, grid-stride loop; x fastest (coalesced).

template <typename T, int NS>
__global__ void __launch_bounds__(256) crf_pool(
    const T* __restrict__ x,
    const T* __restrict__ s0,  // (B, 1, H, W), read only when NS == 2
    const T* __restrict__ s1,
    T* __restrict__ o0,        // (B, C, h, w)
    T* __restrict__ o1,        // written only when NS == 2
    int B, int C, int H, int W, int h, int w, int blur, int pad_y, int pad_x)
{
    const long long total = (long long)B * C * h * w;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int cx = (int)(i % w);
        const long long t = i / w;
        const int cy = (int)(t % h);
        const long long bc = t / h;
        const int b = (int)(bc / C);
        const int ylo = max(cy * blur - pad_y, 0), yhi = min(cy * blur - pad_y + blur, H);
        const int xlo = max(cx * blur - pad_x, 0), xhi = min(cx * blur - pad_x + blur, W);
        const T* xs = x + bc * H * W;
        const T* ss0 = s0 + (long long)b * H * W;
        const T* ss1 = s1 + (long long)b * H * W;
        T acc0 = T(0), acc1 = T(0);
        for (int yy = ylo; yy < yhi; ++yy) {
            for (int xx = xlo; xx < xhi; ++xx) {
                const long long p = (long long)yy * W + xx;
                const T v = xs[p];
                if (NS == 2) {
                    acc0 += v * ss0[p];
                    acc1 += v * ss1[p];
                } else {
                    acc0 += v;
                }
            }
        }
        // 1 / count computed in double and rounded once to T, as the reference does.
        const T inv = (T)(1.0 / ((double)(yhi - ylo) * (double)(xhi - xlo)));
        o0[i] = acc0 * inv;
        if (NS == 2) o1[i] = acc1 * inv;
    }
}
