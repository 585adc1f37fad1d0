// backward.cu -- the per-pixel and per-cell pieces of the mean-field backward pass (vjps).
//
// Self-contained (NVRTC and nvcc, no host headers). Every kernel is a gather: each thread writes
// its own output element(s) and nothing else, so there are no atomics and the results do not
// depend on scheduling (deterministic). Layouts as in update.cu: full resolution (B, C, [D,] H, W),
// coarse grid (B, C, [d,] h, w), per-pixel factors (B, 1, [D,] H, W). ND (2 images, 3 volumes)
// is a template argument; for ND == 2 the depth arguments are ignored and the depth terms are
// compiled out. Volumes have fewer than 2^31 voxels per channel (positions within a channel are
// 32-bit: 64-bit divisions are calls that make these kernels spill). Blur factors and pads are
// per axis.
//
// crf_upsample_backward<T, ND, NS>: the adjoint of the bilinear (trilinear) upsampling (Up^T), one
//   thread per coarse element (b, c, [cz,] cy, cx). Coarse row cy receives from the full-resolution
//   rows Y = ystart[cy] .. ystart[cy] + ycount[cy] - 1 with weights yw[cy, Y - ystart[cy]] (the
//   transpose of the forward taps, built on the host from the same geometry; edge clamping is
//   folded into the weights); the same for columns and depth. Columns are summed first, then
//   rows (the reference's order), then depth planes.
//     NS 0: o0 = Up^T(x)
//        1: o0 = Up^T(x * s0)
//        2: o0 = Up^T(x * s0), o1 = Up^T(x * s1)  (symmetric normalisation: both kernels, one pass)
// crf_pool_backward<T, ND, NS>: the adjoint of the blur pooling (Pool^T), one thread per pixel
//   element (b, c, [Z,] Y, X): the value of the pixel's cell divided by the cell's real-pixel count.
//     NS 0: out = Pool^T(r0);  2: out = n0 * Pool^T(r0) + n1 * Pool^T(r1)
// crf_softmax_backward<T, ND, MODE>: vjp of the softmax over classes given its output q, one
//   thread per pixel: out = q * (g - sum_c q g). The incoming gradient g is
//     MODE 0: an array (B, C, [D,] H, W)
//          1: Pool^T(r0) of a coarse (B, C, [d,] h, w) array, formed on the fly (merged kernel)
//          2: n0 * Pool^T(r0) + n1 * Pool^T(r1) (symmetric normalisation); when `accumulate`, the
//             normaliser gradients gn_s += sum_c q * Pool^T(r_s) are added in place as well
//   (the message vjp of the next-later iteration, never materialised at full resolution).
// crf_upsampled_dot<T, ND>: per pixel, gn0 += sum_c a * Up(x0), gn1 += sum_c a * Up(x1) (the part
//   of the normaliser gradient that comes from the message's own factor n).
// crf_class_products<T>: the (C, C) compatibility gradient, a deterministic block reduction (below).
//
// Launch: 1-D, 256 threads per block, grid-stride loop, fastest index innermost (coalesced).

template <typename T>
__device__ __forceinline__ T crfb_inv_count(int c, int blur, int pad, int n)
{
    const int lo = max(c * blur - pad, 0), hi = min(c * blur - pad + blur, n);
    return (T)(1.0 / (double)(hi - lo));
}

// Up^T within one depth plane: sum over the rows y0 .. y0 + ny - 1 (weights wyr) of the columns
// x0 .. x0 + nx - 1 (weights wxr) of x (and x * s), starting at plane offset `zoff`.
template <typename T, int NS>
__device__ __forceinline__ void crfb_gather_plane(
    const T* __restrict__ xs, const T* __restrict__ ss0, const T* __restrict__ ss1, long long zoff, int W,
    int y0, int ny, const T* __restrict__ wyr, int x0, int nx, const T* __restrict__ wxr, T& acc0, T& acc1)
{
    for (int j = 0; j < ny; ++j) {
        const long long row = zoff + (long long)(y0 + j) * W + x0;
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
}

template <typename T, int ND, int NS>
__global__ void __launch_bounds__(256) crf_upsample_backward(
    const T* __restrict__ x,       // (B, C, [D,] H, W)
    const T* __restrict__ s0,      // (B, 1, [D,] H, W), NS >= 1
    const T* __restrict__ s1,      // (B, 1, [D,] H, W), NS == 2
    const int* __restrict__ zstart, const int* __restrict__ zcount, const T* __restrict__ zw,  // (d,), (d,), (d, Lz)
    const int* __restrict__ ystart, const int* __restrict__ ycount, const T* __restrict__ yw,  // (h,), (h,), (h, Ly)
    const int* __restrict__ xstart, const int* __restrict__ xcount, const T* __restrict__ xw,  // (w,), (w,), (w, Lx)
    T* __restrict__ o0,            // (B, C, [d,] h, w)
    T* __restrict__ o1,            // (B, C, [d,] h, w), NS == 2
    int B, int C, int D, int H, int W, int d, int h, int w, int Lz, int Ly, int Lx)
{
    const long long HW = (long long)H * W;
    const long long vox = ND == 3 ? HW * D : HW;
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
        const T* xs = x + bc * vox;
        const T* ss0 = s0 + (long long)b * vox;
        const T* ss1 = s1 + (long long)b * vox;
        const int y0 = ystart[cy], ny = ycount[cy];
        const int x0 = xstart[cx], nx = xcount[cx];
        const T* wyr = yw + (long long)cy * Ly;
        const T* wxr = xw + (long long)cx * Lx;
        T acc0 = T(0), acc1 = T(0);
        if (ND == 3) {
            const int z0 = zstart[cz], nz = zcount[cz];
            const T* wzr = zw + (long long)cz * Lz;
            for (int jz = 0; jz < nz; ++jz) {
                T p0 = T(0), p1 = T(0);
                crfb_gather_plane<T, NS>(xs, ss0, ss1, (long long)(z0 + jz) * HW, W, y0, ny, wyr, x0, nx, wxr, p0, p1);
                const T wz = wzr[jz];
                acc0 += wz * p0;
                if (NS == 2) acc1 += wz * p1;
            }
        } else {
            crfb_gather_plane<T, NS>(xs, ss0, ss1, 0, W, y0, ny, wyr, x0, nx, wxr, acc0, acc1);
        }
        o0[i] = acc0;
        if (NS == 2) o1[i] = acc1;
    }
}

// The coarse cell of full-resolution element (Z, Y, X) and 1 / (its real-pixel count).
template <typename T, int ND>
__device__ __forceinline__ long long crfb_cell(int Z, int Y, int X, int D, int H, int W, int h, int w,
                                               int blur_z, int blur_y, int blur_x, int pad_z, int pad_y,
                                               int pad_x, T& inv)
{
    const int cy = (Y + pad_y) / blur_y, cx = (X + pad_x) / blur_x;
    inv = crfb_inv_count<T>(cy, blur_y, pad_y, H) * crfb_inv_count<T>(cx, blur_x, pad_x, W);
    if (ND == 3) {
        const int cz = (Z + pad_z) / blur_z;
        inv = crfb_inv_count<T>(cz, blur_z, pad_z, D) * inv;
        return ((long long)cz * h + cy) * w + cx;
    }
    return (long long)cy * w + cx;
}

template <typename T, int ND, int NS>
__global__ void __launch_bounds__(256) crf_pool_backward(
    const T* __restrict__ r0,      // (B, C, [d,] h, w)
    const T* __restrict__ r1,      // (B, C, [d,] h, w), NS == 2
    const T* __restrict__ n0,      // (B, 1, [D,] H, W), NS == 2
    const T* __restrict__ n1,
    T* __restrict__ out,           // (B, C, [D,] H, W)
    int B, int C, int D, int H, int W, int d, int h, int w,
    int blur_z, int blur_y, int blur_x, int pad_z, int pad_y, int pad_x)
{
    const long long HW = ND == 3 ? (long long)D * H * W : (long long)H * W;  // pixels per channel
    const long long hw = ND == 3 ? (long long)d * h * w : (long long)h * w;  // cells per channel
    const long long total = (long long)B * C * HW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int X, Y, Z = 0;
        long long bc;
        if (ND == 3) {  // one 64-bit division (a volume has fewer than 2^31 voxels per channel)
            bc = i / HW;
            const int r = (int)(i - bc * HW);
            const int row = r / W;
            X = r - row * W;
            Z = row / H;
            Y = row - Z * H;
        } else {
            X = (int)(i % W);
            const long long t = i / W;
            Y = (int)(t % H);
            bc = t / H;
        }
        T inv;
        const long long cell = bc * hw + crfb_cell<T, ND>(Z, Y, X, D, H, W, h, w, blur_z, blur_y, blur_x,
                                                          pad_z, pad_y, pad_x, inv);
        T v = r0[cell] * inv;
        if (NS == 2) {
            const long long p = (bc / C) * HW + ((long long)Z * H + Y) * W + X;
            v = v * n0[p] + (r1[cell] * inv) * n1[p];
        }
        out[i] = v;
    }
}

template <typename T, int ND, int MODE>
__global__ void __launch_bounds__(256) crf_softmax_backward(
    const T* __restrict__ q,       // (B, C, [D,] H, W) softmax output
    const T* __restrict__ g,       // (B, C, [D,] H, W), MODE 0
    const T* __restrict__ r0,      // (B, C, [d,] h, w), MODE >= 1
    const T* __restrict__ r1,      // (B, C, [d,] h, w), MODE 2
    const T* __restrict__ n0,      // (B, 1, [D,] H, W), MODE 2
    const T* __restrict__ n1,
    T* __restrict__ gn0,           // (B, 1, [D,] H, W), MODE 2 with accumulate (read and written)
    T* __restrict__ gn1,
    T* __restrict__ out,           // (B, C, [D,] H, W)
    int B, int C, int D, int H, int W, int d, int h, int w,
    int blur_z, int blur_y, int blur_x, int pad_z, int pad_y, int pad_x, int accumulate)
{
    const long long HW = ND == 3 ? (long long)D * H * W : (long long)H * W;
    const long long hw = ND == 3 ? (long long)d * h * w : (long long)h * w;
    const long long total = (long long)B * HW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int b = (int)(i / HW);
        const long long p = i - b * HW;
        const long long base = (long long)b * C * HW + p;
        long long cell = 0;
        T inv = T(0), nv0 = T(0), nv1 = T(0);
        if (MODE >= 1) {
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
            cell = (long long)b * C * hw + crfb_cell<T, ND>(Z, Y, X, D, H, W, h, w, blur_z, blur_y, blur_x,
                                                            pad_z, pad_y, pad_x, inv);
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

template <typename T, int ND>
__global__ void __launch_bounds__(256) crf_upsampled_dot(
    const T* __restrict__ a,       // (B, C, [D,] H, W)
    const T* __restrict__ x0,      // (B, C, [d,] h, w)
    const T* __restrict__ x1,      // (B, C, [d,] h, w)
    const int* __restrict__ zidx, const T* __restrict__ zfrac,  // (2, D), (D,) (ND == 3)
    const int* __restrict__ yidx, const T* __restrict__ yfrac,  // (2, H), (H,)
    const int* __restrict__ xidx, const T* __restrict__ xfrac,  // (2, W), (W,)
    T* __restrict__ gn0,           // (B, 1, [D,] H, W), read and written
    T* __restrict__ gn1,
    int B, int C, int D, int H, int W, int d, int h, int w)
{
    const long long HW = ND == 3 ? (long long)D * H * W : (long long)H * W;
    const long long hw = ND == 3 ? (long long)d * h * w : (long long)h * w;
    const long long total = (long long)B * HW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int b = (int)(i / HW);
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
        const long long base = (long long)b * C * HW + p;
        // Taps exactly as update.cu's crf_interpolate: rows first, then columns, then depth.
        const long long ly = yidx[Y], hy = yidx[H + Y];
        const int lx = xidx[X], hx = xidx[W + X];
        const long long lolo = ly * w + lx, lohi = ly * w + hx, hilo = hy * w + lx, hihi = hy * w + hx;
        const T fy = yfrac[Y], gy = T(1) - fy, fx = xfrac[X], gx = T(1) - fx;
        long long zlo = 0, zhi = 0;
        T fz = T(0), gz = T(1);
        if (ND == 3) {
            zlo = zidx[Z] * ((long long)h * w);
            zhi = zidx[D + Z] * ((long long)h * w);
            fz = zfrac[Z];
            gz = T(1) - fz;
        }
        T acc0 = T(0), acc1 = T(0);
        for (int c = 0; c < C; ++c) {
            const T av = a[base + c * HW];
            const T* m0 = x0 + ((long long)b * C + c) * hw;
            const T* m1 = x1 + ((long long)b * C + c) * hw;
            T u0, u1;
            if (ND == 3) {
                const T* l0 = m0 + zlo;
                const T* h0 = m0 + zhi;
                const T* l1 = m1 + zlo;
                const T* h1 = m1 + zhi;
                u0 = ((l0[lolo] * gy + l0[hilo] * fy) * gx + (l0[lohi] * gy + l0[hihi] * fy) * fx) * gz
                     + ((h0[lolo] * gy + h0[hilo] * fy) * gx + (h0[lohi] * gy + h0[hihi] * fy) * fx) * fz;
                u1 = ((l1[lolo] * gy + l1[hilo] * fy) * gx + (l1[lohi] * gy + l1[hihi] * fy) * fx) * gz
                     + ((h1[lolo] * gy + h1[hilo] * fy) * gx + (h1[lohi] * gy + h1[hihi] * fy) * fx) * fz;
            } else {
                u0 = (m0[lolo] * gy + m0[hilo] * fy) * gx + (m0[lohi] * gy + m0[hihi] * fy) * fx;
                u1 = (m1[lolo] * gy + m1[hilo] * fy) * gx + (m1[lohi] * gy + m1[hihi] * fy) * fx;
            }
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
