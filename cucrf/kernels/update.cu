// update.cu -- bilinear (trilinear) upsampling of coarse messages, fused with the mean-field update.
//
// Self-contained (NVRTC and nvcc, no host headers). ND = 2: images (B, C, H, W), coarse
// (B, C, h, w); ND = 3: volumes (B, C, D, H, W), coarse (B, C, d, h, w), with fewer than 2^31
// voxels per channel (positions within a channel are 32-bit: 64-bit divisions are calls that
// make these kernels spill). For ND == 2 the depth
// arguments (D = d = 1, zidx, zfrac) are ignored and every depth term is compiled out.
//
// Upsampling (ConvCRF geometry, see cucrf/_geometry.py, one blur factor per axis): full-resolution
// row Y reads coarse rows lo = yidx[Y], hi = yidx[H + Y] with weights (1 - fy, fy),
// fy = yfrac[Y] (source coordinate (Y + pad + 0.5) / blur - 0.5 clamped; the crop to H rows is
// built into the tables); the same for columns and depth. Within a depth plane rows are
// interpolated first, then columns; volumes then interpolate between the two depth planes.
//
// crf_update<T, ND, CMAX, MATRIX>: one thread per pixel (b, [Z,] Y, X); all C <= CMAX classes in
//   registers.
//   msg_mode 0: no message (plain softmax of su)
//            1: M = Up(m0)                                   (merged kernel)
//            2: M = Up(m0) * (n0 * w0) + Up(m1) * (n1 * w1)  (symmetric normalisation)
//   same_grid: nonzero when every blur is 1 (the message is read at the pixel itself)
//   MATRIX false (Potts): logits = su + M, or su + (M - sum_c M) when return_logits (the exact
//                          value of a * U - Phi; softmax is invariant to the dropped constant)
//          true (matrix): logits = su + (-(mu M)), mu = compat (C, C) row-major
//   out = softmax over classes (max subtracted, exp, divided by the sum) or the logits.
// crf_upsample<T, ND>: one thread per output element; mode 0: Up(m0); 1: the symmetric
//   combination above; 2: (Up(m0) + eps)^(-1/2) (the symmetric normaliser n = (Up(K 1) + eps)^(-1/2)).
//
// Launch: 256 threads per block, grid-stride loop, X fastest (coalesced); crf_update on volumes
// takes grid (ceil(D H W / 256), B) (grid y over the batch), everything else a 1-D grid.

template <typename T> __device__ __forceinline__ T crf_exp(T v);
template <> __device__ __forceinline__ float crf_exp<float>(float v) { return expf(v); }
template <> __device__ __forceinline__ double crf_exp<double>(double v) { return exp(v); }
template <typename T> __device__ __forceinline__ T crf_sqrt(T v);
template <> __device__ __forceinline__ float crf_sqrt<float>(float v) { return sqrtf(v); }
template <> __device__ __forceinline__ double crf_sqrt<double>(double v) { return sqrt(v); }

template <typename T>
struct CrfTap {
    long long lolo, lohi, hilo, hihi;  // offsets of the four coarse cells (row, column) in a plane
    long long zlo, zhi;                // offsets of the two depth planes (ND == 3)
    T fy, gy, fx, gx, fz, gz;          // weights: gy = 1 - fy, gx = 1 - fx, gz = 1 - fz
};

template <typename T, int ND>
__device__ __forceinline__ CrfTap<T> crf_tap(const int* __restrict__ zidx, const T* __restrict__ zfrac,
                                             const int* __restrict__ yidx, const T* __restrict__ yfrac,
                                             const int* __restrict__ xidx, const T* __restrict__ xfrac,
                                             int D, int H, int W, int h, int w, int Z, int Y, int X)
{
    CrfTap<T> t;
    const long long ly = yidx[Y], hy = yidx[H + Y];
    const int lx = xidx[X], hx = xidx[W + X];
    t.lolo = ly * w + lx;
    t.lohi = ly * w + hx;
    t.hilo = hy * w + lx;
    t.hihi = hy * w + hx;
    t.fy = yfrac[Y];
    t.gy = T(1) - t.fy;
    t.fx = xfrac[X];
    t.gx = T(1) - t.fx;
    if (ND == 3) {
        const long long hw = (long long)h * w;
        t.zlo = zidx[Z] * hw;
        t.zhi = zidx[D + Z] * hw;
        t.fz = zfrac[Z];
        t.gz = T(1) - t.fz;
    } else {  // unused for images (compiled out); defined so that the struct is never read uninitialised
        t.zlo = t.zhi = 0;
        t.fz = T(0);
        t.gz = T(1);
    }
    return t;
}

template <typename T, int ND>
__device__ __forceinline__ T crf_interpolate(const T* __restrict__ m, const CrfTap<T>& t)
{
    if (ND == 3) {
        const T* lo = m + t.zlo;
        const T* hi = m + t.zhi;
        const T plane_lo = (lo[t.lolo] * t.gy + lo[t.hilo] * t.fy) * t.gx + (lo[t.lohi] * t.gy + lo[t.hihi] * t.fy) * t.fx;
        const T plane_hi = (hi[t.lolo] * t.gy + hi[t.hilo] * t.fy) * t.gx + (hi[t.lohi] * t.gy + hi[t.hihi] * t.fy) * t.fx;
        return plane_lo * t.gz + plane_hi * t.fz;
    }
    const T col_lo = m[t.lolo] * t.gy + m[t.hilo] * t.fy;
    const T col_hi = m[t.lohi] * t.gy + m[t.hihi] * t.fy;
    return col_lo * t.gx + col_hi * t.fx;
}

// The depth sizes (D, d) come first: of the argument orders tried, the one where neither an image
// instance needs more registers than the images-only kernel nor a volume instance spills (ptxas'
// allocation moved with the position of these two scalars; see message.cu).
template <typename T, int ND, int CMAX, bool MATRIX>
__global__ void __launch_bounds__(256) crf_update(
    const T* __restrict__ su,      // (B, C, [D,] H, W) scaled unary a * U
    const T* __restrict__ m0,      // (B, C, [d,] h, w) coarse message
    const T* __restrict__ m1,      // (B, C, [d,] h, w) second message (msg_mode 2)
    const T* __restrict__ n0,      // (B, 1, [D,] H, W) normalisers (msg_mode 2)
    const T* __restrict__ n1,
    const T* __restrict__ compat,  // (C, C) (MATRIX)
    const int* __restrict__ zidx, const T* __restrict__ zfrac,  // (2, D), (D,) (ND == 3)
    const int* __restrict__ yidx, const T* __restrict__ yfrac,  // (2, H), (H,)
    const int* __restrict__ xidx, const T* __restrict__ xfrac,  // (2, W), (W,)
    T* __restrict__ out,           // (B, C, [D,] H, W)
    int D, int d, int B, int C, int H, int W, int h, int w, int same_grid,
    int msg_mode, int return_logits, T w0, T w1)
{
    const long long HW = ND == 3 ? (long long)D * H * W : (long long)H * W;  // pixels per channel
    const long long hw = ND == 3 ? (long long)d * h * w : (long long)h * w;  // cells per channel
    // Volumes: grid y runs over the batch (its own loop), so that no 64-bit division (a call that
    // makes the double instances spill) is needed; images: one grid-stride loop over B H W.
    const long long span = ND == 3 ? HW : (long long)B * HW;
    for (int by = ND == 3 ? (int)blockIdx.y : 0; by < (ND == 3 ? B : 1); by += ND == 3 ? (int)gridDim.y : 1) {
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < span;
         j += (long long)gridDim.x * blockDim.x) {
        const long long i = ND == 3 ? (long long)by * HW + j : j;  // (b, [Z,] Y, X) flattened
        const int b = ND == 3 ? by : (int)(i / HW);
        const long long p = i - b * HW;
        int Z = 0, Y, X;
        if (ND == 3) {  // 32-bit: a volume has fewer than 2^31 voxels per channel
            const int row = (int)p / W;
            X = (int)p - row * W;
            Z = row / H;
            Y = row - Z * H;
        } else {
            Y = (int)(p / W);
            X = (int)(p - (long long)Y * W);
        }
        const long long base = (long long)b * C * HW + p;     // (b, 0, [Z,] Y, X) at full resolution
        const long long cbase = (long long)b * C * hw;       // (b, 0, 0, 0) on the coarse grid

        // The message M of each class (zero without one).
        T mv[CMAX];
#pragma unroll
        for (int c = 0; c < CMAX; ++c) mv[c] = T(0);
        if (msg_mode != 0) {
            if (same_grid) {
#pragma unroll
                for (int c = 0; c < CMAX; ++c) {
                    if (c < C) {
                        T v = m0[base + c * HW];
                        if (msg_mode == 2) v = v * (n0[i] * w0) + m1[base + c * HW] * (n1[i] * w1);
                        mv[c] = v;
                    }
                }
            } else {
                const CrfTap<T> t = crf_tap<T, ND>(zidx, zfrac, yidx, yfrac, xidx, xfrac, D, H, W, h, w, Z, Y, X);
                T s0 = T(0), s1 = T(0);
                if (msg_mode == 2) {
                    s0 = n0[i] * w0;
                    s1 = n1[i] * w1;
                }
#pragma unroll
                for (int c = 0; c < CMAX; ++c) {
                    if (c < C) {
                        T v = crf_interpolate<T, ND>(m0 + cbase + c * hw, t);
                        if (msg_mode == 2) v = v * s0 + crf_interpolate<T, ND>(m1 + cbase + c * hw, t) * s1;
                        mv[c] = v;
                    }
                }
            }
        }

        // Logits a U - Phi, in place of the message for Potts (fewer registers).
        T lvs[MATRIX ? CMAX : 1];
        T* lv = MATRIX ? lvs : mv;
        if (msg_mode == 0) {
#pragma unroll
            for (int c = 0; c < CMAX; ++c) if (c < C) lv[c] = su[base + c * HW];
        } else if (!MATRIX) {
            T total_m = T(0);
            if (return_logits) {
#pragma unroll
                for (int c = 0; c < CMAX; ++c) if (c < C) total_m += mv[c];
            }
#pragma unroll
            for (int c = 0; c < CMAX; ++c) {
                if (c < C) lv[c] = su[base + c * HW] + (return_logits ? mv[c] - total_m : mv[c]);
            }
        } else {
#pragma unroll
            for (int c = 0; c < CMAX; ++c) {
                if (c < C) {
                    T phi = T(0);
#pragma unroll
                    for (int l = 0; l < CMAX; ++l) if (l < C) phi += compat[c * C + l] * mv[l];
                    lv[c] = su[base + c * HW] + (-phi);
                }
            }
        }

        if (return_logits) {
#pragma unroll
            for (int c = 0; c < CMAX; ++c) if (c < C) out[base + c * HW] = lv[c];
        } else {
            T mx = lv[0];
#pragma unroll
            for (int c = 1; c < CMAX; ++c) if (c < C) mx = lv[c] > mx ? lv[c] : mx;
            T sum = T(0);
#pragma unroll
            for (int c = 0; c < CMAX; ++c) {
                if (c < C) {
                    lv[c] = crf_exp<T>(lv[c] - mx);
                    sum += lv[c];
                }
            }
#pragma unroll
            for (int c = 0; c < CMAX; ++c) if (c < C) out[base + c * HW] = lv[c] / sum;
        }
    }
    }
}

template <typename T, int ND>
__global__ void __launch_bounds__(256) crf_upsample(
    const T* __restrict__ m0,      // (B, C, [d,] h, w)
    const T* __restrict__ m1,      // (B, C, [d,] h, w) (mode 1)
    const T* __restrict__ n0,      // (B, 1, [D,] H, W) (mode 1)
    const T* __restrict__ n1,
    const int* __restrict__ zidx, const T* __restrict__ zfrac,
    const int* __restrict__ yidx, const T* __restrict__ yfrac,
    const int* __restrict__ xidx, const T* __restrict__ xfrac,
    T* __restrict__ out,           // (B, C, [D,] H, W)
    int B, int C, int D, int H, int W, int d, int h, int w, int mode, T w0, T w1, T eps)
{
    const long long HW = ND == 3 ? (long long)D * H * W : (long long)H * W;
    const long long hw = ND == 3 ? (long long)d * h * w : (long long)h * w;
    const long long total = (long long)B * C * HW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long bc = i / HW;
        const long long p = i - bc * HW;
        const int b = (int)(bc / C);
        int Z = 0, Y, X;
        if (ND == 3) {
            const int row = (int)p / W;
            X = (int)p - row * W;
            Z = row / H;
            Y = row - Z * H;
        } else {
            Y = (int)(p / W);
            X = (int)(p - (long long)Y * W);
        }
        const CrfTap<T> t = crf_tap<T, ND>(zidx, zfrac, yidx, yfrac, xidx, xfrac, D, H, W, h, w, Z, Y, X);
        T v = crf_interpolate<T, ND>(m0 + bc * hw, t);
        if (mode == 1) {
            const long long q = (long long)b * HW + p;
            v = v * (n0[q] * w0) + crf_interpolate<T, ND>(m1 + bc * hw, t) * (n1[q] * w1);
        } else if (mode == 2) {
            v = T(1) / crf_sqrt<T>(v + eps);
        }
        out[i] = v;
    }
}
