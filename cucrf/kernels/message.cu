// message.cu -- ConvCRF message passing on the (coarse) grid, kernel values computed on the fly.
//
// Self-contained: compiles on its own under NVRTC (as CuPy's RawModule does) and under nvcc; no
// host headers. Specialised by template arguments (see cucrf/_cuda/__init__.py):
//   T      float or double
//   ND     spatial axes: 2 (images, (h, w)) or 3 (volumes, (d, h, w)); every depth term below is
//          compiled out when ND == 2, so an image instance does exactly the 2-D work
//   NF     number of feature channels kept in registers (1..5), or 0 for any F (runtime `F`,
//          centre features then read from shared memory)
//   CHUNK  classes accumulated in registers per thread; a launch covers C classes with
//          ceil(C / CHUNK) chunks along gridDim.z (so C has no upper bound)
//   SEP    false: one merged kernel  K = wa * k_app + ws * k_smooth  applied to q0 -> m0
//          true:  appearance and smoothness kept apart (symmetric normalisation):
//                 m0 = wa * k_app (q0),  m1 = ws * k_smooth (q1), in the same pass (the forward
//                 passes wa = ws = 1; the backward pass its kernel weights)
//
// Layout: features (B, F, [d,] h, w), already multiplied by 1 / theta_beta per channel; q and m
// (B, C, [d,] h, w). The window of cell (z, y, x) is every cell (z + dz, y + dy, x + dx),
// |dz| <= rz, |dy| <= ry, |dx| <= rx (one radius per axis), inside the grid (zero outside),
// without the centre unless keep_centre. For ND == 2, d = 1 and rz = 0 are ignored.
//
// The kernel value between cell i and its neighbour j is
//   k_app    = exp(-0.5 * (|f_j - f_i|^2 + az[z, dz] + ay[y, dy] + ax[x, dx]))
//   k_smooth = sz[z, dz] * sy[y, dy] * sx[x, dx]
// where the per-axis tables (one row per cell of the axis, 2 r + 1 columns) hold
//   ay = (pos_y[y + dy] - pos_y[y])^2 / theta_alpha^2,  sy = exp(-0.5 (pos_y[y+dy] - pos_y[y])^2 / theta_gamma^2)
// (same for x and z); pos_* are the coarse cell centres in full-resolution pixels times the
// pixel spacing of the axis. Nothing of size (window x cells) is ever stored.
//
// Launch: block (TX, TY, TZ) with TX along x (coalesced; TZ = 1 for ND == 2), grid
// (ceil(w / TX) * ceil(d / TZ), ceil(h / TY), min(B * nchunks, 65535)): grid x holds the x tiles
// (fastest) and the depth tiles. Dynamic shared memory: the feature tile,
// nf * (TZ + 2 rz) * (TY + 2 ry) * (TX + 2 rx) * sizeof(T).

template <typename T> __device__ __forceinline__ T crf_exp(T v);
template <> __device__ __forceinline__ float crf_exp<float>(float v) { return expf(v); }
template <> __device__ __forceinline__ double crf_exp<double>(double v) { return exp(v); }

// The arguments only volumes need (d, rz) come last: the image instances then keep the argument
// layout of the images-only kernel, and with it ptxas' register allocation (which moved by up to
// 25% with the scalars reordered).
template <typename T, int ND, int NF, int CHUNK, bool SEP>
__global__ void crf_message(
    const T* __restrict__ feat,    // (B, F, [d,] h, w) scaled features
    const T* __restrict__ az_tab,  // (d, kz), ND == 3
    const T* __restrict__ ay_tab,  // (h, ky)
    const T* __restrict__ ax_tab,  // (w, kx)
    const T* __restrict__ sz_tab,  // (d, kz), ND == 3
    const T* __restrict__ sy_tab,  // (h, ky)
    const T* __restrict__ sx_tab,  // (w, kx)
    const T* __restrict__ q0,      // (B, C, [d,] h, w)
    const T* __restrict__ q1,      // (B, C, [d,] h, w), read only when SEP
    T* __restrict__ m0,            // (B, C, [d,] h, w)
    T* __restrict__ m1,            // (B, C, [d,] h, w), written only when SEP
    int B, int C, int F, int h, int w, int ry, int rx, int keep_centre, int nchunks, T wa, T ws, int d, int rz)
{
    extern __shared__ __align__(16) unsigned char crf_smem[];
    T* tile = reinterpret_cast<T*>(crf_smem);

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
    const long long plane = (long long)h * w;
    const long long vol = ND == 3 ? plane * d : plane;  // cells per channel

    for (int z = blockIdx.z; z < B * nchunks; z += gridDim.z) {
        const int b = z / nchunks;
        const int c0 = (z - b * nchunks) * CHUNK;

        // Feature tile of batch b with a halo of (rz, ry, rx) cells; zeros outside the grid (never
        // used: those neighbours are skipped, but the tile is then fully defined).
        __syncthreads();  // the previous z iteration has finished reading the tile
        const T* fb = feat + (long long)b * nf * vol;
        for (int i = tid; i < nf * tile_plane; i += nthreads) {
            const int f = i / tile_plane;
            int rem = i - f * tile_plane;
            int gz = 0;
            if (ND == 3) {
                const int zz = rem / (TH * TW);
                rem -= zz * TH * TW;
                gz = z0 - RZ + zz;
            }
            const int yy = rem / TW;
            const int gy = y0 - ry + yy;
            const int gx = x0 - rx + (rem - yy * TW);
            T v = T(0);
            if (gy >= 0 && gy < h && gx >= 0 && gx < w && (ND == 2 || (gz >= 0 && gz < d)))
                v = fb[f * vol + ((long long)gz * h + gy) * w + gx];
            tile[i] = v;
        }
        __syncthreads();

        if (inside) {
            const int centre = ((ND == 3 ? (threadIdx.z + RZ) * TH : 0) + threadIdx.y + ry) * TW + threadIdx.x + rx;
            T fc[NF > 0 ? NF : 1];
#pragma unroll
            for (int f = 0; f < (NF > 0 ? NF : 1); ++f) fc[f] = NF > 0 ? tile[f * tile_plane + centre] : T(0);

            T acc0[CHUNK];
            T acc1[SEP ? CHUNK : 1];
#pragma unroll
            for (int j = 0; j < CHUNK; ++j) acc0[j] = T(0);
#pragma unroll
            for (int j = 0; j < (SEP ? CHUNK : 1); ++j) acc1[j] = T(0);

            const long long qoff = ((long long)b * C + c0) * vol;
            const T* qb0 = q0 + qoff;
            const T* qb1 = q1 + qoff;

            for (int dz = -RZ; dz <= RZ; ++dz) {
                const int zn = zc + dz;
                if (ND == 3 && (zn < 0 || zn >= d)) continue;
                const T az = ND == 3 ? az_tab[zc * kz + dz + RZ] : T(0);
                const T sz = ND == 3 ? sz_tab[zc * kz + dz + RZ] : T(1);
                for (int dy = -ry; dy <= ry; ++dy) {
                    const int yn = y + dy;
                    if (yn < 0 || yn >= h) continue;
                    // Depth and row terms of the window row (for images, the row terms alone).
                    const T ay = ND == 3 ? az + ay_tab[y * ky + dy + ry] : ay_tab[y * ky + dy + ry];
                    const T sy = ND == 3 ? sz * sy_tab[y * ky + dy + ry] : sy_tab[y * ky + dy + ry];
                    const int trow = centre + ((ND == 3 ? dz * TH : 0) + dy) * TW;
                    const long long row = ((long long)zn * h + yn) * w;
                    for (int dx = -rx; dx <= rx; ++dx) {
                        const int xn = x + dx;
                        if (xn < 0 || xn >= w) continue;
                        if (dz == 0 && dy == 0 && dx == 0 && !keep_centre) continue;
                        T colour = T(0);
                        if (NF > 0) {
#pragma unroll
                            for (int f = 0; f < (NF > 0 ? NF : 1); ++f) {
                                const T dd = tile[f * tile_plane + trow + dx] - fc[f];
                                colour += dd * dd;
                            }
                        } else {
                            for (int f = 0; f < nf; ++f) {
                                const T dd = tile[f * tile_plane + trow + dx] - tile[f * tile_plane + centre];
                                colour += dd * dd;
                            }
                        }
                        const T ka = crf_exp<T>(T(-0.5) * (colour + (ay + ax_tab[x * kx + dx + rx])));
                        const T ks = sy * sx_tab[x * kx + dx + rx];
                        const long long off = row + xn;
                        if (SEP) {
#pragma unroll
                            for (int j = 0; j < CHUNK; ++j) {
                                if (c0 + j < C) {
                                    acc0[j] += ka * qb0[j * vol + off];
                                    acc1[SEP ? j : 0] += ks * qb1[j * vol + off];
                                }
                            }
                        } else {
                            const T kk = wa * ka + ws * ks;
#pragma unroll
                            for (int j = 0; j < CHUNK; ++j) {
                                if (c0 + j < C) acc0[j] += kk * qb0[j * vol + off];
                            }
                        }
                    }
                }
            }

            const long long out = qoff + ((long long)zc * h + y) * w + x;
#pragma unroll
            for (int j = 0; j < CHUNK; ++j) {
                if (c0 + j < C) {
                    m0[out + j * vol] = SEP ? wa * acc0[j] : acc0[j];
                    if (SEP) m1[out + j * vol] = ws * acc1[SEP ? j : 0];
                }
            }
        }
    }
}
