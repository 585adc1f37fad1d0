// message.cu -- ConvCRF message passing on the (coarse) grid, kernel values computed on the fly.
//
// Self-contained: compiles on its own under NVRTC (as CuPy's RawModule does) and under nvcc; no
// host headers. Specialised by template arguments (see cucrf/_cuda/__init__.py):
//   T      float or double
//   NF     number of feature channels kept in registers (1..5), or 0 for any F (runtime `F`,
//          centre features then read from shared memory)
//   CHUNK  classes accumulated in registers per thread; a launch covers C classes with
//          ceil(C / CHUNK) chunks along gridDim.z (so C has no upper bound)
//   SEP    false: one merged kernel  K = wa * k_app + ws * k_smooth  applied to q0 -> m0
//          true:  appearance and smoothness kept apart (symmetric normalisation):
//                 m0 = wa * k_app (q0),  m1 = ws * k_smooth (q1), in the same pass (the forward
//                 passes wa = ws = 1; the backward pass its kernel weights)
//
// Layout: features (B, F, h, w), already multiplied by 1 / theta_beta per channel; q and m
// (B, C, h, w). The window of cell (y, x) is every cell (y + dy, x + dx), |dy|, |dx| <= radius,
// inside the grid (zero outside), without (dy, dx) = (0, 0) unless keep_centre.
//
// The kernel value between cell i and its neighbour j is
//   k_app    = exp(-0.5 * (|f_j - f_i|^2 + ay[y, dy] + ax[x, dx]))
//   k_smooth = sy[y, dy] * sx[x, dx]
// where the per-axis tables (h or w rows, 2 * radius + 1 columns) hold
//   ay = (pos_y[y + dy] - pos_y[y])^2 / theta_alpha^2,  sy = exp(-0.5 (pos_y[y+dy] - pos_y[y])^2 / theta_gamma^2)
// (same for x); pos_* are the coarse cell centres in full-resolution pixels (ConvCRF geometry).
// Nothing of size (window x cells) is ever stored.
//
// Launch: block (TX, TY) with TX along x (coalesced), grid (ceil(w / TX), ceil(h / TY), min(B * nchunks, 65535));
// dynamic shared memory: the feature tile, nf * (TY + 2 radius) * (TX + 2 radius) * sizeof(T).

template <typename T> __device__ __forceinline__ T crf_exp(T v);
template <> __device__ __forceinline__ float crf_exp<float>(float v) { return expf(v); }
template <> __device__ __forceinline__ double crf_exp<double>(double v) { return exp(v); }

template <typename T, int NF, int CHUNK, bool SEP>
__global__ void crf_message(
    const T* __restrict__ feat,    // (B, F, h, w) scaled features
    const T* __restrict__ ay_tab,  // (h, k)
    const T* __restrict__ ax_tab,  // (w, k)
    const T* __restrict__ sy_tab,  // (h, k)
    const T* __restrict__ sx_tab,  // (w, k)
    const T* __restrict__ q0,      // (B, C, h, w)
    const T* __restrict__ q1,      // (B, C, h, w), read only when SEP
    T* __restrict__ m0,            // (B, C, h, w)
    T* __restrict__ m1,            // (B, C, h, w), written only when SEP
    int B, int C, int F, int h, int w, int radius, int keep_centre, int nchunks, T wa, T ws)
{
    extern __shared__ __align__(16) unsigned char crf_smem[];
    T* tile = reinterpret_cast<T*>(crf_smem);

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

    for (int z = blockIdx.z; z < B * nchunks; z += gridDim.z) {
        const int b = z / nchunks;
        const int c0 = (z - b * nchunks) * CHUNK;

        // Feature tile of batch b with a halo of `radius` cells; zeros outside the grid (never
        // used: those neighbours are skipped, but the tile is then fully defined).
        __syncthreads();  // the previous z iteration has finished reading the tile
        const T* fb = feat + (long long)b * nf * plane;
        for (int i = tid; i < nf * tile_plane; i += nthreads) {
            const int f = i / tile_plane;
            const int rem = i - f * tile_plane;
            const int yy = rem / TW;
            const int gy = y0 - radius + yy;
            const int gx = x0 - radius + (rem - yy * TW);
            T v = T(0);
            if (gy >= 0 && gy < h && gx >= 0 && gx < w) v = fb[f * plane + (long long)gy * w + gx];
            tile[i] = v;
        }
        __syncthreads();

        if (inside) {
            const int centre = (threadIdx.y + radius) * TW + threadIdx.x + radius;
            T fc[NF > 0 ? NF : 1];
#pragma unroll
            for (int f = 0; f < (NF > 0 ? NF : 1); ++f) fc[f] = NF > 0 ? tile[f * tile_plane + centre] : T(0);

            T acc0[CHUNK];
            T acc1[SEP ? CHUNK : 1];
#pragma unroll
            for (int j = 0; j < CHUNK; ++j) acc0[j] = T(0);
#pragma unroll
            for (int j = 0; j < (SEP ? CHUNK : 1); ++j) acc1[j] = T(0);

            const long long qoff = ((long long)b * C + c0) * plane;
            const T* qb0 = q0 + qoff;
            const T* qb1 = q1 + qoff;

            for (int dy = -radius; dy <= radius; ++dy) {
                const int yn = y + dy;
                if (yn < 0 || yn >= h) continue;
                const T ay = ay_tab[y * k + dy + radius];
                const T sy = sy_tab[y * k + dy + radius];
                const int trow = centre + dy * TW;
                for (int dx = -radius; dx <= radius; ++dx) {
                    const int xn = x + dx;
                    if (xn < 0 || xn >= w) continue;
                    if (dy == 0 && dx == 0 && !keep_centre) continue;
                    T colour = T(0);
                    if (NF > 0) {
#pragma unroll
                        for (int f = 0; f < (NF > 0 ? NF : 1); ++f) {
                            const T d = tile[f * tile_plane + trow + dx] - fc[f];
                            colour += d * d;
                        }
                    } else {
                        for (int f = 0; f < nf; ++f) {
                            const T d = tile[f * tile_plane + trow + dx] - tile[f * tile_plane + centre];
                            colour += d * d;
                        }
                    }
                    const T ka = crf_exp<T>(T(-0.5) * (colour + (ay + ax_tab[x * k + dx + radius])));
                    const T ks = sy * sx_tab[x * k + dx + radius];
                    const long long off = (long long)yn * w + xn;
                    if (SEP) {
#pragma unroll
                        for (int j = 0; j < CHUNK; ++j) {
                            if (c0 + j < C) {
                                acc0[j] += ka * qb0[j * plane + off];
                                acc1[SEP ? j : 0] += ks * qb1[j * plane + off];
                            }
                        }
                    } else {
                        const T kk = wa * ka + ws * ks;
#pragma unroll
                        for (int j = 0; j < CHUNK; ++j) {
                            if (c0 + j < C) acc0[j] += kk * qb0[j * plane + off];
                        }
                    }
                }
            }

            const long long out = qoff + (long long)y * w + x;
#pragma unroll
            for (int j = 0; j < CHUNK; ++j) {
                if (c0 + j < C) {
                    m0[out + j * plane] = SEP ? wa * acc0[j] : acc0[j];
                    if (SEP) m1[out + j * plane] = ws * acc1[SEP ? j : 0];
                }
            }
        }
    }
}
