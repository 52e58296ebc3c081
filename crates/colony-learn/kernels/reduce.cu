// Reductions: the MSE loss with its gradient, and column sums (the bias gradients).

#define COLONY_REDUCE_THREADS 256
#define COLONY_COLUMN_BLOCK_ROWS 8

// Writes grad[i] = grad_scale * (pred[i] - target[i]) and, per block, the sum of squared
// differences into partial_sums[blockIdx.x]; the host adds the partial sums in double and divides
// by len. Blocks stride over the input so the grid (and the partial-sum buffer) stays small.
// Launch with exactly COLONY_REDUCE_THREADS threads per block: the tree below assumes it.
extern "C" __global__ void __launch_bounds__(COLONY_REDUCE_THREADS)
colony_mse_loss_grad(const float* __restrict__ pred, const float* __restrict__ target,
                     float* __restrict__ grad, float* __restrict__ partial_sums,
                     int len, float grad_scale)
{
    __shared__ float sums[COLONY_REDUCE_THREADS];
    const long long stride = (long long)blockDim.x * gridDim.x;
    float local = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        const float d = pred[i] - target[i];
        grad[i] = grad_scale * d;
        local += d * d;
    }
    sums[threadIdx.x] = local;
    __syncthreads();
    for (int half = COLONY_REDUCE_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            sums[threadIdx.x] += sums[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        partial_sums[blockIdx.x] = sums[0];
    }
}

// out[col] = sum over rows of a[row * cols + col]. A block of 32 x COLONY_COLUMN_BLOCK_ROWS
// threads owns 32 adjacent columns, so each warp reads 32 consecutive floats of one row; each
// thread sums every COLONY_COLUMN_BLOCK_ROWS-th row, then one thread per column adds those up.
extern "C" __global__ void __launch_bounds__(32 * COLONY_COLUMN_BLOCK_ROWS)
colony_column_sums(const float* __restrict__ a, float* __restrict__ out, int rows, int cols)
{
    __shared__ float sums[COLONY_COLUMN_BLOCK_ROWS][33];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int col = blockIdx.x * 32 + tx;
    float local = 0.0f;
    if (col < cols) {
        for (int row = ty; row < rows; row += COLONY_COLUMN_BLOCK_ROWS) {
            local += a[(long long)row * cols + col];
        }
    }
    sums[ty][tx] = local;
    __syncthreads();
    if (ty == 0 && col < cols) {
        float total = 0.0f;
#pragma unroll
        for (int r = 0; r < COLONY_COLUMN_BLOCK_ROWS; ++r) {
            total += sums[r][tx];
        }
        out[col] = total;
    }
}
