// backward.cu -- the per-pixel and per-cell pieces of the mean-field backward pass (vjps).
//
// Self-contained (NVRTC and nvcc, no host headers). Every kernel is a gather: each thread writes
// its own output element(s) and nothing else, so there are no atomics and the results do not
// depend on scheduling (deterministic). Layouts as in update.cu: full resolution (B, C, H, W),
// coarse grid (B, C, h, w), per-pixel factors (B, 1, H, W).
//
// crf_upsample_backward<T, NS>: the adjoint of the bilinear upsampling (Up^T), one thread per
//   coarse element (b, c, cy, cx). Coarse row cy receives from the full-resolution rows
//   Y = ystart[cy] .. ystart[cy] + ycount[cy] - 1 with weights yw[cy, Y - ystart[cy]] (the
//   transpose of the forward taps, built on the host from the same geometry; edge clamping is
//   folded into the weights); the same for columns. Columns are summed first, then rows (the
//   reference's order).
//     NS 0: o0 = Up^T(x)
//        1: o0 = Up^T(x * s0)
//        2: o0 = Up^T(x * s0), o1 = Up^T(x * s1)  (symmetric normalisation: both kernels, one pass)
// crf_pool_backward<T, NS>: the adjoint of the blur pooling (Pool^T), one thread per pixel
//   element (b, c, Y, X): the value of the pixel's cell divided by the cell's real-pixel count.
//     NS 0: out = Pool^T(r0);  2: out = n0 * Pool^T(r0) + n1 * Pool^T(r1)
// crf_softmax_backward<T, MODE>: vjp of the softmax over classes given its output q, one thread
//   per pixel: out = q * (g - sum_c q g). The incoming gradient g is
//     MODE 0: an array (B, C, H, W)
//          1: Pool^T(r0) of a coarse (B, C, h, w) array, formed on the fly (merged kernel)
//          2: n0 * Pool^T(r0) + n1 * Pool^T(r1) (symmetric normalisation); when `accumulate`, the
//             normaliser gradients gn_s += sum_c q * Pool^T(r_s) are added in place as well
//   (the message vjp of the next-later iteration, never materialised at full resolution).
// crf_upsampled_dot<T>: per pixel, gn0 += sum_c a * Up(x0), gn1 += sum_c a * Up(x1) (the part of
//   the normaliser gradient that comes from the message's own factor n).
// crf_class_products<T>: the (C, C) compatibility gradient, a deterministic block reduction (below).
//
// Launch: 1-D, 256 threads per block, grid-stride loop, fastest index innermost (coalesced).

template <typename T>
__device__ __forceinline__ T crfb_inv_count(int c, int blur, int pad, int n)
{
    const int lo = max(c * blur - pad, 0), hi = min(c * blur - pad + blur, n);
    return (T)(1.0 / (double)(hi - lo));
}

template <typename T, int NS>
__global__ void __launch_bounds__(256) crf_upsample_backward(
    const T* __restrict__ x,       // (B, C, H, W)
    const T* __restrict__ s0,      // (B, 1, H, W), NS >= 1
    const T* __restrict__ s1,      // (B, 1, H, W), NS == 2
    const int* __restrict__ ystart, const int* __restrict__ ycount, const T* __restrict__ yw,  // (h,), (h,), (h, Ly)
    const int* __restrict__ xstart, const int* __restrict__ xcount, const T* __restrict__ xw,  // (w,), (w,), (w, Lx)
    T* __restrict__ o0,            // (B, C, h, w)
    T* __restrict__ o1,            // (B, C, h, w), NS == 2
    int B, int C, int H, int W, int h, int w, int Ly, int Lx)
{
    const long long HW = (long long)H * W;
    const long long total = (long long)B * C * h * w;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int cx = (int)(i % w);
        const long long t = i / w;
        const int cy = (int)(t % h);
        const long long bc = t / h;
        const int b = (int)(bc / C);
        const T* xs = x + bc * HW;
        const T* ss0 = s0 + (long long)b * HW;
        const T* ss1 = s1 + (long long)b * HW;
        const int y0 = ystart[cy], ny = ycount[cy];
        const int x0 = xstart[cx], nx = xcount[cx];
        const T* wyr = yw + (long long)cy * Ly;
        const T* wxr = xw + (long long)cx * Lx;
        T acc0 = T(0), acc1 = T(0);
        for (int j = 0; j < ny; ++j) {
            const long long row = (long long)(y0 + j) * W + x0;
            T r0 = T(0), r1 = T(0);
            for (int k = 0; k < nx; ++k) {
                const T v = xs[row + k];
                const T wk = wxr[k];
                if (NS == 0) {
                    r0 += wk * v;
                } else {
                    r0 += wk * (v * ss0[row + k]);
                    if (NS == 2) r1 += wk * (v * ss1[row + k]);
                }
            }
            const T wj = wyr[j];
            acc0 += wj * r0;
            if (NS == 2) acc1 += wj * r1;
        }
        o0[i] = acc0;
        if (NS == 2) o1[i] = acc1;
    }
}

template <typename T, int NS>
__global__ void __launch_bounds__(256) crf_pool_backward(
    const T* __restrict__ r0,      // (B, C, h, w)
    const T* __restrict__ r1,      // (B, C, h, w), NS == 2
    const T* __restrict__ n0,      // (B, 1, H, W), NS == 2
    const T* __restrict__ n1,
    T* __restrict__ out,           // (B, C, H, W)
    int B, int C, int H, int W, int h, int w, int blur, int pad_y, int pad_x)
{
    const long long HW = (long long)H * W;
    const long long hw = (long long)h * w;
    const long long total = (long long)B * C * HW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int X = (int)(i % W);
        const long long t = i / W;
        const int Y = (int)(t % H);
        const long long bc = t / H;
        const int cy = (Y + pad_y) / blur, cx = (X + pad_x) / blur;
        const T inv = crfb_inv_count<T>(cy, blur, pad_y, H) * crfb_inv_count<T>(cx, blur, pad_x, W);
        const long long cell = bc * hw + (long long)cy * w + cx;
        T v = r0[cell] * inv;
        if (NS == 2) {
            const long long p = (bc / C) * HW + (long long)Y * W + X;
            v = v * n0[p] + (r1[cell] * inv) * n1[p];
        }
        out[i] = v;
    }
}

template <typename T, int MODE>
__global__ void __launch_bounds__(256) crf_softmax_backward(
    const T* __restrict__ q,       // (B, C, H, W) softmax output
    const T* __restrict__ g,       // (B, C, H, W), MODE 0
    const T* __restrict__ r0,      // (B, C, h, w), MODE >= 1
    const T* __restrict__ r1,      // (B, C, h, w), MODE 2
    const T* __restrict__ n0,      // (B, 1, H, W), MODE 2
    const T* __restrict__ n1,
    T* __restrict__ gn0,           // (B, 1, H, W), MODE 2 with accumulate (read and written)
    T* __restrict__ gn1,
    T* __restrict__ out,           // (B, C, H, W)
    int B, int C, int H, int W, int h, int w, int blur, int pad_y, int pad_x, int accumulate)
{
    const long long HW = (long long)H * W;
    const long long hw = (long long)h * w;
    const long long total = (long long)B * HW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int b = (int)(i / HW);
        const long long p = i - b * HW;
        const int Y = (int)(p / W), X = (int)(p - (long long)Y * W);
        const long long base = (long long)b * C * HW + p;
        long long cell = 0;
        T inv = T(0), nv0 = T(0), nv1 = T(0);
        if (MODE >= 1) {
            const int cy = (Y + pad_y) / blur, cx = (X + pad_x) / blur;
            inv = crfb_inv_count<T>(cy, blur, pad_y, H) * crfb_inv_count<T>(cx, blur, pad_x, W);
            cell = (long long)b * C * hw + (long long)cy * w + cx;
            if (MODE == 2) {
                nv0 = n0[i];
                nv1 = n1[i];
            }
        }
        // Pass 1: sum_c q g (and the normaliser terms); pass 2 writes. The second pass re-reads
        // q and g (L1/L2 hits: a block's 256 pixels x C classes).
        T inner = T(0), a0 = T(0), a1 = T(0);
        for (int c = 0; c < C; ++c) {
            const T qv = q[base + c * HW];
            T gv;
            if (MODE == 0) {
                gv = g[base + c * HW];
            } else if (MODE == 1) {
                gv = r0[cell + c * hw] * inv;
            } else {
                const T u0 = r0[cell + c * hw] * inv, u1 = r1[cell + c * hw] * inv;
                gv = u0 * nv0 + u1 * nv1;
                a0 += qv * u0;
                a1 += qv * u1;
            }
            inner += qv * gv;
        }
        for (int c = 0; c < C; ++c) {
            const T qv = q[base + c * HW];
            T gv;
            if (MODE == 0) {
                gv = g[base + c * HW];
            } else if (MODE == 1) {
                gv = r0[cell + c * hw] * inv;
            } else {
                gv = (r0[cell + c * hw] * inv) * nv0 + (r1[cell + c * hw] * inv) * nv1;
            }
            out[base + c * HW] = qv * (gv - inner);
        }
        if (MODE == 2 && accumulate) {
            gn0[i] += a0;
            gn1[i] += a1;
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(256) crf_upsampled_dot(
    const T* __restrict__ a,       // (B, C, H, W)
    const T* __restrict__ x0,      // (B, C, h, w)
    const T* __restrict__ x1,      // (B, C, h, w)
    const int* __restrict__ yidx, const T* __restrict__ yfrac,  // (2, H), (H,)
    const int* __restrict__ xidx, const T* __restrict__ xfrac,  // (2, W), (W,)
    T* __restrict__ gn0,           // (B, 1, H, W), read and written
    T* __restrict__ gn1,
    int B, int C, int H, int W, int h, int w)
{
    const long long HW = (long long)H * W;
    const long long hw = (long long)h * w;
    const long long total = (long long)B * HW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int b = (int)(i / HW);
        const long long p = i - b * HW;
        const int Y = (int)(p / W), X = (int)(p - (long long)Y * W);
        const long long base = (long long)b * C * HW + p;
        // Bilinear taps exactly as update.cu's crf_bilinear: rows first, then columns.
        const long long ly = yidx[Y], hy = yidx[H + Y];
        const int lx = xidx[X], hx = xidx[W + X];
        const long long lolo = ly * w + lx, lohi = ly * w + hx, hilo = hy * w + lx, hihi = hy * w + hx;
        const T fy = yfrac[Y], gy = T(1) - fy, fx = xfrac[X], gx = T(1) - fx;
        T acc0 = T(0), acc1 = T(0);
        for (int c = 0; c < C; ++c) {
            const T av = a[base + c * HW];
            const T* m0 = x0 + ((long long)b * C + c) * hw;
            const T* m1 = x1 + ((long long)b * C + c) * hw;
            const T u0 = (m0[lolo] * gy + m0[hilo] * fy) * gx + (m0[lohi] * gy + m0[hihi] * fy) * fx;
            const T u1 = (m1[lolo] * gy + m1[hilo] * fy) * gx + (m1[lohi] * gy + m1[hihi] * fy) * fx;
            acc0 += av * u0;
            acc1 += av * u1;
        }
        gn0[i] += acc0;
        gn1[i] += acc1;
    }
}

// crf_class_products<T>: the compatibility gradient's class-by-class products,
//   sum over blocks of partials[blk, c, l] = -(w0 sum_{b, i} a0[b, c, i] m0[b, l, i]
//                                            + w1 sum_{b, i} a1[b, c, i] m1[b, l, i])
// in double (a_s, m_s: (B, C, N); the second pair only when `two`). The B * ceil(N / tn) tiles of
// tn columns are dealt to the blocks round-robin (block k takes tiles k, k + gridDim.x, ...); a
// block stages a tile of every class row in shared memory (row stride tn + 1: no bank conflicts),
// then each thread adds the tile's products to the (c, l) pairs it owns (p = tid, tid + 256, ...)
// in the block's own row of `partials`. Every input element is read once; every sum has a fixed
// order; the host adds the block rows in a fixed order (deterministic, no atomics).
// Launch: grid (G,), block (256,), dynamic shared memory 2 (1 + two) C (tn + 1) sizeof(T).
template <typename T>
__global__ void __launch_bounds__(256) crf_class_products(
    const T* __restrict__ a0, const T* __restrict__ m0,
    const T* __restrict__ a1, const T* __restrict__ m1,
    double* __restrict__ partials, // (gridDim.x, C, C)
    int B, int C, long long N, int tn, int two, double w0, double w1)
{
    extern __shared__ __align__(16) unsigned char crf_smem[];
    const int ld = tn + 1;
    T* ta0 = reinterpret_cast<T*>(crf_smem);
    T* tm0 = ta0 + C * ld;
    T* ta1 = tm0 + C * ld;
    T* tm1 = ta1 + C * ld;
    const int tid = threadIdx.x;
    const int pairs = C * C;
    double* acc = partials + (long long)blockIdx.x * pairs;
    for (int p = tid; p < pairs; p += blockDim.x) acc[p] = 0.0;
    const long long per_image = (N + tn - 1) / tn;
    const long long ntiles = (long long)B * per_image;
    for (long long t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const int b = (int)(t / per_image);
        const long long i0 = (t - (long long)b * per_image) * tn;
        const int n = (int)(N - i0 < tn ? N - i0 : tn);
        __syncthreads();  // the previous tile has been used
        for (int e = tid; e < C * tn; e += blockDim.x) {
            const int c = e / tn, j = e - c * tn;
            const long long src = ((long long)b * C + c) * N + i0 + j;
            const bool ok = j < n;
            ta0[c * ld + j] = ok ? a0[src] : T(0);
            tm0[c * ld + j] = ok ? m0[src] : T(0);
            if (two) {
                ta1[c * ld + j] = ok ? a1[src] : T(0);
                tm1[c * ld + j] = ok ? m1[src] : T(0);
            }
        }
        __syncthreads();
        for (int p = tid; p < pairs; p += blockDim.x) {
            const int c = p / C, l = p - c * C;
            double s0 = 0.0, s1 = 0.0;
            for (int j = 0; j < n; ++j) {
                s0 += (double)ta0[c * ld + j] * (double)tm0[l * ld + j];
                if (two) s1 += (double)ta1[c * ld + j] * (double)tm1[l * ld + j];
            }
            acc[p] += -(w0 * s0 + (two ? w1 * s1 : 0.0));
        }
    }
}
