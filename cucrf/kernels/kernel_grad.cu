// kernel_grad.cu -- gradient of the pairwise kernels with respect to their parameters and features.
//
// Self-contained (NVRTC and nvcc, no host headers). Template arguments:
//   T      float or double
//   ND     spatial axes: 2 (images, (h, w)) or 3 (volumes, (d, h, w)); depth terms compiled out for 2
//   NF     feature channels kept in registers (1..5), or 0 for any F (per-thread accumulators
//          then live in shared memory)
//   CHUNK  stacked classes per thread (8 or 16); ceil(CT / CHUNK) chunks along grid z
//
// What it computes. The backward passes of the messages leave, for kernel slice s, the message
// gradients G_s = left_s and the message inputs P_s = right_s, (B, CT, h, w) with every
// iteration's classes stacked (CT = T * C), (B, CT, d, h, w) for volumes. The gradient with respect to the kernel value between
// cell i and its window neighbour j is
//   gK_s(i, j) = scale_s * A_s(i, j) + rows_s(i),   A_s(i, j) = sum_c G_s[c, i] P_s[c, j]
// (rows_s: the gradient of the row sums, symmetric normalisation only). Every quantity the
// parameters need from a pair (k_app, k_smooth, the squared distance d2, the scaled feature
// difference) is symmetric in (i, j), and so is the window, so
//   sum_{i, j} gK(i, j) phi(i, j) = 1/2 sum_x sum_{j in window(x)} gsym(x, j) phi(x, j),
//   gsym(x, j) = gK(x, j) + gK(j, x) = scale * (A(x, j) + A(j, x)) + rows(x) + rows(j).
// The feature gradient of cell x collects both roles of x (centre and neighbour):
//   dL/df_x = alpha_s * ib^2 * sum_j gsym(x, j) k_app(x, j) (f_j - f_x)
// so each thread (one cell) gathers exactly its own contributions: no atomics, no (window x cells)
// buffer; kernel values are recomputed on the fly as in message.cu. The price is computing
// A(j, x) as well as A(x, j) (2 CT multiply-adds per pair instead of CT).
//
// Slices: z = ((b * S) + s) * nchunks + chunk. S = 1: one merged kernel (both k_app and k_smooth
// terms); S = 2: s = 0 appearance only, s = 1 smoothness only (symmetric normalisation).
// rows_s is added in chunk 0 only.
//
// Outputs.
//   feat_out[z, f, y, x] = alpha * ib_f * sum_j gsym k_app dfs_f  (dfs = scaled difference;
//     zero for smoothness slices); the host sums the slices (fixed order).
//   partials[z, by, bx, p]: the block's sums, in double, of
//     p = 0: gsym k_app        1: gsym k_smooth      2: gsym k_app d2     3: gsym k_smooth d2
//         4: A_sym k_app       5: A_sym k_smooth     6 + f: gsym k_app dfs_f^2
//   (each thread sums its window in T; the block's threads are then added by a fixed-order tree
//   in shared memory; the host adds the blocks in a fixed order: deterministic.)
//
// The window, the per-axis tables (one radius per axis, positions times the pixel spacing) and
// the tile are message.cu's; d2 = dz2 + dy2 + dx2 (dz2 only for volumes).
//
// Launch: block (TX, TY, TZ) (TZ = 1 for images), TX * TY * TZ a power of two, grid
// (ceil(w / TX) * ceil(d / TZ), ceil(h / TY), min(B * S * nchunks, 65535)) (grid x: x tiles
// fastest, then depth tiles); dynamic shared memory: see cucrf._cuda.kernel_grad_launch.

template <typename T> __device__ __forceinline__ T crfk_exp(T v);
template <> __device__ __forceinline__ float crfk_exp<float>(float v) { return expf(v); }
template <> __device__ __forceinline__ double crfk_exp<double>(double v) { return exp(v); }

// Tree reduction of `rows` rows of nthreads doubles each (red[r * nthreads + t]); nthreads is a
// power of two. The caller has written its own column; on return red[r * nthreads] holds the sums.
__device__ __forceinline__ void crfk_block_reduce(double* red, int rows, int nthreads, int tid)
{
    for (int stride = nthreads >> 1; stride > 0; stride >>= 1) {
        __syncthreads();
        if (tid < stride) {
            for (int r = 0; r < rows; ++r) red[r * nthreads + tid] += red[r * nthreads + tid + stride];
        }
    }
    __syncthreads();
}

// No __launch_bounds__: with one, ptxas holds the kernel to 128 registers and CHUNK = 16 spills;
// without, it takes 72-150 (float) / 128-192 (double), and a 256-thread block always fits.
// The window radii and the volume-only arguments come last (see message.cu): of the orders tried,
// this one keeps the image instances' register counts closest to the images-only kernel's.
template <typename T, int ND, int NF, int CHUNK>
__global__ void crf_kernel_grad(
    const T* __restrict__ feat,     // (B, F, [d,] h, w) features / theta_beta
    const T* __restrict__ az_tab,   // (d, kz) dz^2 / theta_alpha^2 (ND == 3)
    const T* __restrict__ ay_tab,   // (h, ky) dy^2 / theta_alpha^2
    const T* __restrict__ ax_tab,   // (w, kx)
    const T* __restrict__ sz_tab,   // (d, kz) exp(-dz^2 / (2 theta_gamma^2)) (ND == 3)
    const T* __restrict__ sy_tab,   // (h, ky) exp(-dy^2 / (2 theta_gamma^2))
    const T* __restrict__ sx_tab,   // (w, kx)
    const T* __restrict__ dz2_tab,  // (d, kz) dz^2 (position units^2) (ND == 3)
    const T* __restrict__ dy2_tab,  // (h, ky) dy^2
    const T* __restrict__ dx2_tab,  // (w, kx)
    const T* __restrict__ left0,    // (B, CT, [d,] h, w) slice 0
    const T* __restrict__ right0,
    const T* __restrict__ left1,    // slice 1 (S == 2)
    const T* __restrict__ right1,
    const T* __restrict__ rows0,    // (B, 1, [d,] h, w), has_rows
    const T* __restrict__ rows1,
    const T* __restrict__ inv_beta, // (F,)
    T* __restrict__ feat_out,       // (B * S * nchunks, F, [d,] h, w)
    double* __restrict__ partials,  // (B * S * nchunks, gridDim.y, gridDim.x, 6 + F)
    int B, int CT, int F, int h, int w, int keep_centre, int S, int nchunks,
    int has_rows, T scale0, T scale1, T alpha, int ry, int rx, int d, int rz)
{
    extern __shared__ __align__(16) unsigned char crf_smem[];
    const int nf = NF > 0 ? NF : F;
    const int RZ = ND == 3 ? rz : 0;  // compile-time 0 for images
    const int kz = 2 * RZ + 1, ky = 2 * ry + 1, kx = 2 * rx + 1;
    const int TX = blockDim.x, TY = blockDim.y, TZ = ND == 3 ? (int)blockDim.z : 1;
    const int TW = TX + 2 * rx, TH = TY + 2 * ry;
    const int tile_plane = (ND == 3 ? (TZ + 2 * RZ) * TH : TH) * TW;
    const int tid = ND == 3 ? (threadIdx.z * TY + threadIdx.y) * TX + threadIdx.x : threadIdx.y * TX + threadIdx.x;
    const int nthreads = TX * TY * TZ;
    const int xtiles = ND == 3 ? (w + TX - 1) / TX : 1;
    const int x0 = (ND == 3 ? blockIdx.x % xtiles : blockIdx.x) * TX, y0 = blockIdx.y * TY;
    const int z0 = ND == 3 ? (blockIdx.x / xtiles) * TZ : 0;
    const int x = x0 + threadIdx.x, y = y0 + threadIdx.y, zc = ND == 3 ? z0 + (int)threadIdx.z : 0;
    const bool inside = x < w && y < h && (ND == 2 || zc < d);
    const long long plane = ND == 3 ? (long long)h * w * d : (long long)h * w;  // cells per channel
    const int np = 6 + nf;

    // Shared memory: [0, front) the feature tile, later reused by the reduction; [front, ...) the
    // per-thread feature accumulators of the generic instance (NF == 0).
    T* tile = reinterpret_cast<T*>(crf_smem);
    double* red = reinterpret_cast<double*>(crf_smem);
    int front = nf * tile_plane * (int)sizeof(T);
    const int red_bytes = (NF > 0 ? np : 6) * nthreads * (int)sizeof(double);
    front = front > red_bytes ? front : red_bytes;
    front = (front + 15) & ~15;
    T* acc_ib = reinterpret_cast<T*>(crf_smem + front);  // [f * nthreads + tid], NF == 0
    T* acc_fg = acc_ib + nf * nthreads;

    const int nz = B * S * nchunks;
    for (int z = blockIdx.z; z < nz; z += gridDim.z) {
        const int b = z / (S * nchunks);
        const int rem = z - b * S * nchunks;
        const int s = rem / nchunks;
        const int chunk = rem - s * nchunks;
        const int c0 = chunk * CHUNK;
        const bool app = s == 0;              // uniform over the block
        const bool smo = S == 1 || s == 1;
        const T* L = (s == 0 ? left0 : left1) + ((long long)b * CT + c0) * plane;
        const T* R = (s == 0 ? right0 : right1) + ((long long)b * CT + c0) * plane;
        const T* rows = (s == 0 ? rows0 : rows1) + (long long)b * plane;
        const bool use_rows = has_rows != 0 && chunk == 0;
        const T scale = s == 0 ? scale0 : scale1;

        __syncthreads();  // the previous z iteration has finished with the tile / reduction
        if (app) {
            const T* fb = feat + (long long)b * nf * plane;
            for (int i = tid; i < nf * tile_plane; i += nthreads) {
                const int f = i / tile_plane;
                int r = i - f * tile_plane;
                int gz = 0;
                if (ND == 3) {
                    const int zz = r / (TH * TW);
                    r -= zz * TH * TW;
                    gz = z0 - RZ + zz;
                }
                const int yy = r / TW;
                const int gy = y0 - ry + yy;
                const int gx = x0 - rx + (r - yy * TW);
                T v = T(0);
                if (gy >= 0 && gy < h && gx >= 0 && gx < w && (ND == 2 || (gz >= 0 && gz < d)))
                    v = fb[f * plane + ((long long)gz * h + gy) * w + gx];
                tile[i] = v;
            }
        }
        __syncthreads();

        T p_ka = T(0), p_ks = T(0), p_kad2 = T(0), p_ksd2 = T(0), p_dka = T(0), p_dks = T(0);
        T p_ib[NF > 0 ? NF : 1], p_fg[NF > 0 ? NF : 1];
#pragma unroll
        for (int f = 0; f < (NF > 0 ? NF : 1); ++f) {
            p_ib[f] = T(0);
            p_fg[f] = T(0);
        }
        if (NF == 0) {
            for (int f = 0; f < nf; ++f) {
                acc_ib[f * nthreads + tid] = T(0);
                acc_fg[f * nthreads + tid] = T(0);
            }
        }

        if (inside) {
            const int centre = ((ND == 3 ? (threadIdx.z + RZ) * TH : 0) + threadIdx.y + ry) * TW + threadIdx.x + rx;
            T fc[NF > 0 ? NF : 1];
#pragma unroll
            for (int f = 0; f < (NF > 0 ? NF : 1); ++f) fc[f] = (NF > 0 && app) ? tile[f * tile_plane + centre] : T(0);

            const long long own = ((long long)zc * h + y) * w + x;
            T gcv[CHUNK], pcv[CHUNK];
#pragma unroll
            for (int j = 0; j < CHUNK; ++j) {
                const bool ok = c0 + j < CT;
                gcv[j] = ok ? L[j * plane + own] : T(0);
                pcv[j] = ok ? R[j * plane + own] : T(0);
            }
            const T row_own = use_rows ? rows[own] : T(0);

            for (int dz = -RZ; dz <= RZ; ++dz) {
                const int zn = zc + dz;
                if (ND == 3 && (zn < 0 || zn >= d)) continue;
                const T az = ND == 3 ? az_tab[zc * kz + dz + RZ] : T(0);
                const T sz = ND == 3 ? sz_tab[zc * kz + dz + RZ] : T(1);
                const T dz2 = ND == 3 ? dz2_tab[zc * kz + dz + RZ] : T(0);
                for (int dy = -ry; dy <= ry; ++dy) {
                    const int yn = y + dy;
                    if (yn < 0 || yn >= h) continue;
                    // Depth and row terms of the window row (for images, the row terms alone).
                    const T ay = ND == 3 ? az + ay_tab[y * ky + dy + ry] : ay_tab[y * ky + dy + ry];
                    const T sy = ND == 3 ? sz * sy_tab[y * ky + dy + ry] : sy_tab[y * ky + dy + ry];
                    const T dy2 = ND == 3 ? dz2 + dy2_tab[y * ky + dy + ry] : dy2_tab[y * ky + dy + ry];
                    const int trow = centre + ((ND == 3 ? dz * TH : 0) + dy) * TW;
                    const long long row = ((long long)zn * h + yn) * w;
                    for (int dx = -rx; dx <= rx; ++dx) {
                        const int xn = x + dx;
                        if (xn < 0 || xn >= w) continue;
                        if (dz == 0 && dy == 0 && dx == 0 && !keep_centre) continue;
                        const long long off = row + xn;

                        // A(x, j) + A(j, x) over this chunk's classes.
                        T asym = T(0);
#pragma unroll
                        for (int j = 0; j < CHUNK; ++j) {
                            if (c0 + j < CT) asym += gcv[j] * R[j * plane + off] + L[j * plane + off] * pcv[j];
                        }
                        T g = scale * asym;
                        if (use_rows) g += row_own + rows[off];
                        const T d2 = dy2 + dx2_tab[x * kx + dx + rx];

                        if (smo) {
                            const T ks = sy * sx_tab[x * kx + dx + rx];
                            const T gks = g * ks;
                            p_ks += gks;
                            p_ksd2 += gks * d2;
                            p_dks += asym * ks;
                        }
                        if (app) {
                            T colour = T(0);
                            T dd[NF > 0 ? NF : 1];
                            if (NF > 0) {
#pragma unroll
                                for (int f = 0; f < (NF > 0 ? NF : 1); ++f) {
                                    dd[f] = tile[f * tile_plane + trow + dx] - fc[f];
                                    colour += dd[f] * dd[f];
                                }
                            } else {
                                for (int f = 0; f < nf; ++f) {
                                    const T df = tile[f * tile_plane + trow + dx] - tile[f * tile_plane + centre];
                                    colour += df * df;
                                }
                            }
                            const T ka = crfk_exp<T>(T(-0.5) * (colour + (ay + ax_tab[x * kx + dx + rx])));
                            const T e = g * ka;
                            p_ka += e;
                            p_kad2 += e * d2;
                            p_dka += asym * ka;
                            if (NF > 0) {
#pragma unroll
                                for (int f = 0; f < (NF > 0 ? NF : 1); ++f) {
                                    const T ed = e * dd[f];
                                    p_fg[f] += ed;
                                    p_ib[f] += ed * dd[f];
                                }
                            } else {
                                for (int f = 0; f < nf; ++f) {
                                    const T df = tile[f * tile_plane + trow + dx] - tile[f * tile_plane + centre];
                                    const T ed = e * df;
                                    acc_fg[f * nthreads + tid] += ed;
                                    acc_ib[f * nthreads + tid] += ed * df;
                                }
                            }
                        }
                    }
                }
            }

            // This cell's feature gradient from this slice (zero for a smoothness slice).
            T* fo = feat_out + (long long)z * nf * plane + own;
            if (NF > 0) {
#pragma unroll
                for (int f = 0; f < (NF > 0 ? NF : 1); ++f) fo[f * plane] = app ? alpha * inv_beta[f] * p_fg[f] : T(0);
            } else {
                for (int f = 0; f < nf; ++f)
                    fo[f * plane] = app ? alpha * inv_beta[f] * acc_fg[f * nthreads + tid] : T(0);
            }
        }

        // Block sums in a fixed order. The tile is dead once every thread is past its window loop.
        double* out = partials + (((long long)z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * np;
        __syncthreads();
        red[0 * nthreads + tid] = (double)p_ka;
        red[1 * nthreads + tid] = (double)p_ks;
        red[2 * nthreads + tid] = (double)p_kad2;
        red[3 * nthreads + tid] = (double)p_ksd2;
        red[4 * nthreads + tid] = (double)p_dka;
        red[5 * nthreads + tid] = (double)p_dks;
        if (NF > 0) {
#pragma unroll
            for (int f = 0; f < (NF > 0 ? NF : 1); ++f) red[(6 + f) * nthreads + tid] = (double)p_ib[f];
            crfk_block_reduce(red, np, nthreads, tid);
            if (tid == 0) {
                for (int r = 0; r < np; ++r) out[r] = red[r * nthreads];
            }
        } else {
            crfk_block_reduce(red, 6, nthreads, tid);
            if (tid == 0) {
                for (int r = 0; r < 6; ++r) out[r] = red[r * nthreads];
            }
            for (int f = 0; f < nf; ++f) {
                __syncthreads();  // thread 0 has read the previous sums
                red[tid] = (double)acc_ib[f * nthreads + tid];
                crfk_block_reduce(red, 1, nthreads, tid);
                if (tid == 0) out[6 + f] = red[0];
            }
        }
    }
}
