// kernel_grad.cu -- gradient of the pairwise kernels with respect to their parameters and features.
//
// Self-contained (NVRTC and nvcc, no host headers). Template arguments:
//   T      float or double
//   NF     feature channels kept in registers (1..5), or 0 for any F (per-thread accumulators
//          then live in shared memory)
//   CHUNK  stacked classes per thread (8 or 16); ceil(CT / CHUNK) chunks along grid z
//
// What it computes. The backward passes of the messages leave, for kernel slice s, the message
// gradients G_s = left_s and the message inputs P_s = right_s, (B, CT, h, w) with every
// iteration's classes stacked (CT = T * C). The gradient with respect to the kernel value between
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
// Launch: block (TX, TY), TX * TY a power of two, grid (ceil(w / TX), ceil(h / TY),
// min(B * S * nchunks, 65535)); dynamic shared memory: see cucrf._cuda.kernel_grad_launch.

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
template <typename T, int NF, int CHUNK>
__global__ void crf_kernel_grad(
    const T* __restrict__ feat,     // (B, F, h, w) features / theta_beta
    const T* __restrict__ ay_tab,   // (h, k) dy^2 / theta_alpha^2
    const T* __restrict__ ax_tab,   // (w, k)
    const T* __restrict__ sy_tab,   // (h, k) exp(-dy^2 / (2 theta_gamma^2))
    const T* __restrict__ sx_tab,   // (w, k)
    const T* __restrict__ dy2_tab,  // (h, k) dy^2 (pixels^2)
    const T* __restrict__ dx2_tab,  // (w, k)
    const T* __restrict__ left0,    // (B, CT, h, w) slice 0
    const T* __restrict__ right0,
    const T* __restrict__ left1,    // slice 1 (S == 2)
    const T* __restrict__ right1,
    const T* __restrict__ rows0,    // (B, 1, h, w), has_rows
    const T* __restrict__ rows1,
    const T* __restrict__ inv_beta, // (F,)
    T* __restrict__ feat_out,       // (B * S * nchunks, F, h, w)
    double* __restrict__ partials,  // (B * S * nchunks, gridDim.y, gridDim.x, 6 + F)
    int B, int CT, int F, int h, int w, int radius, int keep_centre, int S, int nchunks,
    int has_rows, T scale0, T scale1, T alpha)
{
    extern __shared__ __align__(16) unsigned char crf_smem[];
    const int nf = NF > 0 ? NF : F;
    const int k = 2 * radius + 1;
    const int TX = blockDim.x, TY = blockDim.y;
    const int TW = TX + 2 * radius, TH = TY + 2 * radius;
    const int tile_plane = TH * TW;
    const int tid = threadIdx.y * TX + threadIdx.x;
    const int nthreads = TX * TY;
    const int x0 = blockIdx.x * TX, y0 = blockIdx.y * TY;
    const int x = x0 + threadIdx.x, y = y0 + threadIdx.y;
    const bool inside = x < w && y < h;
    const long long plane = (long long)h * w;
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
                const int r = i - f * tile_plane;
                const int yy = r / TW;
                const int gy = y0 - radius + yy;
                const int gx = x0 - radius + (r - yy * TW);
                T v = T(0);
                if (gy >= 0 && gy < h && gx >= 0 && gx < w) v = fb[f * plane + (long long)gy * w + gx];
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
            const int centre = (threadIdx.y + radius) * TW + threadIdx.x + radius;
            T fc[NF > 0 ? NF : 1];
#pragma unroll
            for (int f = 0; f < (NF > 0 ? NF : 1); ++f) fc[f] = (NF > 0 && app) ? tile[f * tile_plane + centre] : T(0);

            const long long own = (long long)y * w + x;
            T gcv[CHUNK], pcv[CHUNK];
#pragma unroll
            for (int j = 0; j < CHUNK; ++j) {
                const bool ok = c0 + j < CT;
                gcv[j] = ok ? L[j * plane + own] : T(0);
                pcv[j] = ok ? R[j * plane + own] : T(0);
            }
            const T row_own = use_rows ? rows[own] : T(0);

            for (int dy = -radius; dy <= radius; ++dy) {
                const int yn = y + dy;
                if (yn < 0 || yn >= h) continue;
                const T ay = ay_tab[y * k + dy + radius];
                const T sy = sy_tab[y * k + dy + radius];
                const T dy2 = dy2_tab[y * k + dy + radius];
                const int trow = centre + dy * TW;
                for (int dx = -radius; dx <= radius; ++dx) {
                    const int xn = x + dx;
                    if (xn < 0 || xn >= w) continue;
                    if (dy == 0 && dx == 0 && !keep_centre) continue;
                    const long long off = (long long)yn * w + xn;

                    // A(x, j) + A(j, x) over this chunk's classes.
                    T asym = T(0);
#pragma unroll
                    for (int j = 0; j < CHUNK; ++j) {
                        if (c0 + j < CT) asym += gcv[j] * R[j * plane + off] + L[j * plane + off] * pcv[j];
                    }
                    T g = scale * asym;
                    if (use_rows) g += row_own + rows[off];
                    const T d2 = dy2 + dx2_tab[x * k + dx + radius];

                    if (smo) {
                        const T ks = sy * sx_tab[x * k + dx + radius];
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
                                const T d = tile[f * tile_plane + trow + dx] - tile[f * tile_plane + centre];
                                colour += d * d;
                            }
                        }
                        const T ka = crfk_exp<T>(T(-0.5) * (colour + (ay + ax_tab[x * k + dx + radius])));
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
                                const T d = tile[f * tile_plane + trow + dx] - tile[f * tile_plane + centre];
                                const T ed = e * d;
                                acc_fg[f * nthreads + tid] += ed;
                                acc_ib[f * nthreads + tid] += ed * d;
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
