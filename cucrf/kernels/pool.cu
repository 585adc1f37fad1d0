// pool.cu -- ConvCRF blur pooling: average of the real pixels of each cell (blur pixels per axis).
//
// Self-contained (NVRTC and nvcc, no host headers). Template arguments:
//   T   float or double
//   ND  spatial axes: 2 (images (H, W)) or 3 (volumes (D, H, W), fewer than 2^31 voxels per
//       channel); for ND == 2 the depth arguments (D = d = 1, blur_z = 1, pad_z = 0) are ignored
//   NS  0: o0 = Pool(x)
//       2: o0 = Pool(x * s0), o1 = Pool(x * s1)   (symmetric normalisation: one pass, two outputs)
//
// x (B, C, [D,] H, W) -> o (B, C, [d,] h, w), h = ceil(H / blur_y) (one blur factor per axis).
// Cell (cy, cx) covers the padded rows [cy * blur_y, cy * blur_y + blur_y) i.e. the real rows
// [cy * blur_y - pad_y, ... + blur_y) clipped to [0, H) (ConvCRF:
// pad_y = ceil(((blur_y - H % blur_y) % blur_y) / 2), count_include_pad = False); the same for
// columns and depth. s0, s1 (B, 1, [D,] H, W) are per-pixel factors shared by all channels.
// With every blur 1 the kernel is the identity (NS = 0) or the products x * s (NS = 2).
//
// Launch: 1-D, one thread per output element, grid-stride loop; x fastest (coalesced).

template <typename T, int ND, int NS>
__global__ void __launch_bounds__(256) crf_pool(
    const T* __restrict__ x,
    const T* __restrict__ s0,  // (B, 1, [D,] H, W), read only when NS == 2
    const T* __restrict__ s1,
    T* __restrict__ o0,        // (B, C, [d,] h, w)
    T* __restrict__ o1,        // written only when NS == 2
    int B, int C, int D, int H, int W, int d, int h, int w,
    int blur_z, int blur_y, int blur_x, int pad_z, int pad_y, int pad_x)
{
    const long long vox = ND == 3 ? (long long)D * H * W : (long long)H * W;  // pixels per channel
    const long long total = (long long)B * C * (ND == 3 ? d : 1) * h * w;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int cx, cy, cz = 0;
        long long bc;
        if (ND == 3) {  // one 64-bit division (a volume has fewer than 2^31 cells per channel)
            const long long cells = (long long)d * h * w;
            bc = i / cells;
            const int r = (int)(i - bc * cells);
            const int row = r / w;
            cx = r - row * w;
            cz = row / h;
            cy = row - cz * h;
        } else {
            cx = (int)(i % w);
            const long long t = i / w;
            cy = (int)(t % h);
            bc = t / h;
        }
        const int b = (int)(bc / C);
        const int ylo = max(cy * blur_y - pad_y, 0), yhi = min(cy * blur_y - pad_y + blur_y, H);
        const int xlo = max(cx * blur_x - pad_x, 0), xhi = min(cx * blur_x - pad_x + blur_x, W);
        const int zlo = ND == 3 ? max(cz * blur_z - pad_z, 0) : 0;
        const int zhi = ND == 3 ? min(cz * blur_z - pad_z + blur_z, D) : 1;
        const T* xs = x + bc * vox;
        const T* ss0 = s0 + (long long)b * vox;
        const T* ss1 = s1 + (long long)b * vox;
        T acc0 = T(0), acc1 = T(0);
        for (int zz = zlo; zz < zhi; ++zz) {
            for (int yy = ylo; yy < yhi; ++yy) {
                for (int xx = xlo; xx < xhi; ++xx) {
                    const long long p = ((long long)zz * H + yy) * W + xx;
                    const T v = xs[p];
                    if (NS == 2) {
                        acc0 += v * ss0[p];
                        acc1 += v * ss1[p];
                    } else {
                        acc0 += v;
                    }
                }
            }
        }
        // 1 / count computed in double and rounded once to T, as the reference does.
        const double count = ND == 3 ? (double)(zhi - zlo) * (double)(yhi - ylo) * (double)(xhi - xlo)
                                     : (double)(yhi - ylo) * (double)(xhi - xlo);
        const T inv = (T)(1.0 / count);
        o0[i] = acc0 * inv;
        if (NS == 2) o1[i] = acc1 * inv;
    }
}
