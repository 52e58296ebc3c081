// Element-wise kernels: the ReLU derivative and the Adam update. One thread per element; the
// host launches ceil(len / blockDim.x) blocks, and the index is computed in 64 bits because
// blockIdx.x * blockDim.x can pass INT_MAX when len is close to it.

#define COLONY_ELEMENTWISE_THREADS 256

// out = grad where the layer's ReLU output was positive, else 0. The activation after ReLU is
// positive exactly where the pre-activation was, so the forward pass need not keep both.
extern "C" __global__ void __launch_bounds__(COLONY_ELEMENTWISE_THREADS)
colony_relu_backward(const float* __restrict__ grad, const float* __restrict__ activation,
                     float* __restrict__ out, int len)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        out[i] = activation[i] > 0.0f ? grad[i] : 0.0f;
    }
}

// One Adam step on `len` parameters. The bias corrections 1 - beta^t are computed once on the
// host (in double, shared with the CPU reference) rather than with powf in every thread.
// The expression order matches adam_update in cpu.rs.
extern "C" __global__ void __launch_bounds__(COLONY_ELEMENTWISE_THREADS)
colony_adam_update(float* __restrict__ param, const float* __restrict__ grad,
                   float* __restrict__ m, float* __restrict__ v, int len, float lr,
                   float beta1, float beta2, float eps, float bias_correction1,
                   float bias_correction2)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        const float g = grad[i];
        const float m_new = beta1 * m[i] + (1.0f - beta1) * g;
        const float v_new = beta2 * v[i] + (1.0f - beta2) * (g * g);
        m[i] = m_new;
        v[i] = v_new;
        const float m_hat = m_new / bias_correction1;
        const float v_hat = v_new / bias_correction2;
        param[i] -= lr * m_hat / (sqrtf(v_hat) + eps);
    }
}
