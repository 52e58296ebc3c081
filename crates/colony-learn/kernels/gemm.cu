// Tiled shared-memory GEMM for the MLP, in the three forms training needs:
//   colony_gemm_ab   C = A  * B     A is m x k, B is k x n   (forward)
//   colony_gemm_atb  C = A' * B     A is k x m, B is k x n   (weight gradients)
//   colony_gemm_abt  C = A  * B'    A is m x k, B is n x k   (gradients flowing back)
// All matrices are row-major f32 and C is m x n. `flags` fuses an epilogue: COLONY_GEMM_BIAS adds
// bias[col] to every row, COLONY_GEMM_RELU then clamps at zero. Every load and store is
// bounds-checked, so any m, k, n works; the host keeps m*k, k*n and m*n within int range.
//
// A block of 32 x 8 threads computes one 32 x 32 tile of C, each thread four rows of one column.
// Every thread accumulates its dot product in ascending k, the same order as the CPU reference in
// cpu.rs, so the two differ only by rounding (fused multiply-adds here).

#define COLONY_TILE 32
#define COLONY_GEMM_BLOCK_ROWS 8
#define COLONY_GEMM_ROWS_PER_THREAD (COLONY_TILE / COLONY_GEMM_BLOCK_ROWS)
#define COLONY_GEMM_BIAS 1
#define COLONY_GEMM_RELU 2

// The transposition flags are literals at every call site, so after inlining each kernel keeps
// only its own load pattern; this is how the three forms share one body without templates.
__device__ __forceinline__ void colony_gemm_tiled(
    const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ bias,
    float* __restrict__ c, int m, int k, int n, int flags, bool a_transposed, bool b_transposed)
{
    // One column of padding makes the transposed stores (stride 33) hit 32 different banks.
    __shared__ float a_tile[COLONY_TILE][COLONY_TILE + 1];
    __shared__ float b_tile[COLONY_TILE][COLONY_TILE + 1];

    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int row0 = blockIdx.y * COLONY_TILE;
    const int col0 = blockIdx.x * COLONY_TILE;

    float acc[COLONY_GEMM_ROWS_PER_THREAD];
#pragma unroll
    for (int i = 0; i < COLONY_GEMM_ROWS_PER_THREAD; ++i) {
        acc[i] = 0.0f;
    }

    for (int k0 = 0; k0 < k; k0 += COLONY_TILE) {
#pragma unroll
        for (int i = 0; i < COLONY_GEMM_ROWS_PER_THREAD; ++i) {
            const int r = ty + i * COLONY_GEMM_BLOCK_ROWS;
            // a_tile[row][kk]; consecutive threads always read consecutive addresses.
            if (!a_transposed) {
                const int row = row0 + r;
                const int kk = k0 + tx;
                a_tile[r][tx] = (row < m && kk < k) ? a[row * k + kk] : 0.0f;
            } else {
                const int row = row0 + tx;
                const int kk = k0 + r;
                a_tile[tx][r] = (row < m && kk < k) ? a[kk * m + row] : 0.0f;
            }
            // b_tile[kk][col]
            if (!b_transposed) {
                const int kk = k0 + r;
                const int col = col0 + tx;
                b_tile[r][tx] = (kk < k && col < n) ? b[kk * n + col] : 0.0f;
            } else {
                const int col = col0 + r;
                const int kk = k0 + tx;
                b_tile[tx][r] = (kk < k && col < n) ? b[col * k + kk] : 0.0f;
            }
        }
        __syncthreads();

#pragma unroll
        for (int kk = 0; kk < COLONY_TILE; ++kk) {
            const float b_value = b_tile[kk][tx];
#pragma unroll
            for (int i = 0; i < COLONY_GEMM_ROWS_PER_THREAD; ++i) {
                acc[i] += a_tile[ty + i * COLONY_GEMM_BLOCK_ROWS][kk] * b_value;
            }
        }
        // The next iteration overwrites the tiles this one is still reading.
        __syncthreads();
    }

    const int col = col0 + tx;
    if (col >= n) {
        return;
    }
    const float bias_value = (flags & COLONY_GEMM_BIAS) ? bias[col] : 0.0f;
#pragma unroll
    for (int i = 0; i < COLONY_GEMM_ROWS_PER_THREAD; ++i) {
        const int row = row0 + ty + i * COLONY_GEMM_BLOCK_ROWS;
        if (row < m) {
            float value = acc[i] + bias_value;
            if (flags & COLONY_GEMM_RELU) {
                value = fmaxf(value, 0.0f);
            }
            c[row * n + col] = value;
        }
    }
}

extern "C" __global__ void __launch_bounds__(COLONY_TILE * COLONY_GEMM_BLOCK_ROWS)
colony_gemm_ab(const float* __restrict__ a, const float* __restrict__ b,
               const float* __restrict__ bias, float* __restrict__ c,
               int m, int k, int n, int flags)
{
    colony_gemm_tiled(a, b, bias, c, m, k, n, flags, false, false);
}

extern "C" __global__ void __launch_bounds__(COLONY_TILE * COLONY_GEMM_BLOCK_ROWS)
colony_gemm_atb(const float* __restrict__ a, const float* __restrict__ b,
                const float* __restrict__ bias, float* __restrict__ c,
                int m, int k, int n, int flags)
{
    colony_gemm_tiled(a, b, bias, c, m, k, n, flags, true, false);
}

extern "C" __global__ void __launch_bounds__(COLONY_TILE * COLONY_GEMM_BLOCK_ROWS)
colony_gemm_abt(const float* __restrict__ a, const float* __restrict__ b,
                const float* __restrict__ bias, float* __restrict__ c,
                int m, int k, int n, int flags)
{
    colony_gemm_tiled(a, b, bias, c, m, k, n, flags, false, true);
}
