//! The CPU reference: exactly the math the CUDA kernels implement, as the same primitive
//! operations, and the [`CpuBackend`] that runs training with them.
//!
//! Each GEMM accumulates every output in ascending k from zero in f32, then adds the bias, then
//! applies the ReLU, which is the order the kernels use; results differ from the GPU's only by
//! rounding (the GPU fuses multiply-adds). Reductions that produce the loss accumulate in f64.

use crate::adam::AdamConfig;
use crate::backend::{
    check_adam, check_gemm, check_len, product, Backend, BackendError, Epilogue, GemmDims,
    GemmForm, OpError,
};

/// C = A·B (+ bias) (ReLU), with A m x k and B k x n, all row-major.
pub fn gemm_ab(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    epilogue: Epilogue<'_, [f32]>,
) -> Result<Vec<f32>, OpError> {
    let dims = GemmDims { m, k, n };
    let lens =
        check_gemm(GemmForm::Ab, dims, a.len(), b.len(), epilogue.bias.map(<[f32]>::len), None)?;
    let mut c = vec![0.0_f32; lens.c];
    if n > 0 {
        for (i, c_row) in c.chunks_exact_mut(n).enumerate() {
            for p in 0..k {
                let a_ip = a[i * k + p];
                for (c_ij, b_pj) in c_row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                    *c_ij += a_ip * b_pj;
                }
            }
        }
    }
    apply_epilogue(&mut c, n, epilogue);
    Ok(c)
}

/// C = Aᵀ·B (+ bias) (ReLU), with A stored k x m and B k x n; C is m x n.
pub fn gemm_atb(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    epilogue: Epilogue<'_, [f32]>,
) -> Result<Vec<f32>, OpError> {
    let dims = GemmDims { m, k, n };
    let lens =
        check_gemm(GemmForm::Atb, dims, a.len(), b.len(), epilogue.bias.map(<[f32]>::len), None)?;
    let mut c = vec![0.0_f32; lens.c];
    if n > 0 {
        // p outermost keeps each output's sum in ascending k while reading A and B row by row.
        for p in 0..k {
            let b_row = &b[p * n..(p + 1) * n];
            for (i, c_row) in c.chunks_exact_mut(n).enumerate() {
                let a_pi = a[p * m + i];
                for (c_ij, b_pj) in c_row.iter_mut().zip(b_row) {
                    *c_ij += a_pi * b_pj;
                }
            }
        }
    }
    apply_epilogue(&mut c, n, epilogue);
    Ok(c)
}

/// C = A·Bᵀ (+ bias) (ReLU), with A m x k and B stored n x k; C is m x n.
pub fn gemm_abt(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    epilogue: Epilogue<'_, [f32]>,
) -> Result<Vec<f32>, OpError> {
    let dims = GemmDims { m, k, n };
    let lens =
        check_gemm(GemmForm::Abt, dims, a.len(), b.len(), epilogue.bias.map(<[f32]>::len), None)?;
    let mut c = vec![0.0_f32; lens.c];
    if n > 0 {
        for (i, c_row) in c.chunks_exact_mut(n).enumerate() {
            let a_row = &a[i * k..(i + 1) * k];
            for (j, c_ij) in c_row.iter_mut().enumerate() {
                let b_row = &b[j * k..(j + 1) * k];
                let mut sum = 0.0_f32;
                for (a_ip, b_jp) in a_row.iter().zip(b_row) {
                    sum += a_ip * b_jp;
                }
                *c_ij = sum;
            }
        }
    }
    apply_epilogue(&mut c, n, epilogue);
    Ok(c)
}

fn apply_epilogue(c: &mut [f32], n: usize, epilogue: Epilogue<'_, [f32]>) {
    if n == 0 {
        return;
    }
    for row in c.chunks_exact_mut(n) {
        if let Some(bias) = epilogue.bias {
            for (value, b) in row.iter_mut().zip(bias) {
                *value += b;
            }
        }
        if epilogue.relu {
            // `max` returns 0 for a NaN input, as the kernel's fmaxf does.
            for value in row.iter_mut() {
                *value = value.max(0.0);
            }
        }
    }
}

/// out = grad where activation > 0, else 0.
pub fn relu_backward(grad: &[f32], activation: &[f32]) -> Result<Vec<f32>, OpError> {
    check_len("relu_backward", "activation", grad.len(), activation.len())?;
    Ok(grad.iter().zip(activation).map(|(&g, &a)| if a > 0.0 { g } else { 0.0 }).collect())
}

/// The factor in d(loss)/d(pred) = scale · (pred - target) for the mean over `len` elements,
/// rounded once so both backends multiply by the same f32.
pub fn mse_grad_scale(len: usize) -> f32 {
    (2.0 / len as f64) as f32
}

/// The mean over every element of (pred - target)², and its gradient with respect to `pred`.
pub fn mse_loss_and_grad(pred: &[f32], target: &[f32]) -> Result<(f32, Vec<f32>), OpError> {
    const OP: &str = "mse_loss_and_grad";
    check_len(OP, "target", pred.len(), target.len())?;
    if pred.is_empty() {
        return Err(OpError::Empty { op: OP });
    }
    let scale = mse_grad_scale(pred.len());
    let mut sum = 0.0_f64;
    let grad = pred
        .iter()
        .zip(target)
        .map(|(&p, &t)| {
            let d = p - t;
            sum += f64::from(d * d);
            scale * d
        })
        .collect();
    Ok(((sum / pred.len() as f64) as f32, grad))
}

/// out[c] = Σ_r a[r][c] for a rows x cols matrix: the bias gradient of a layer.
pub fn column_sums(a: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, OpError> {
    check_len("column_sums", "a", product("column_sums", rows, cols)?, a.len())?;
    let mut out = vec![0.0_f32; cols];
    if cols > 0 {
        for row in a.chunks_exact(cols) {
            for (sum, value) in out.iter_mut().zip(row) {
                *sum += value;
            }
        }
    }
    Ok(out)
}

/// One Adam step for `step` counted from 1, in the kernel's expression order.
pub fn adam_update(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    adam: &AdamConfig,
    step: u64,
) -> Result<(), OpError> {
    check_adam(param.len(), grad.len(), m.len(), v.len(), step)?;
    let (bias_correction1, bias_correction2) = adam.bias_corrections(step);
    for i in 0..param.len() {
        let g = grad[i];
        let m_new = adam.beta1 * m[i] + (1.0 - adam.beta1) * g;
        let v_new = adam.beta2 * v[i] + (1.0 - adam.beta2) * (g * g);
        m[i] = m_new;
        v[i] = v_new;
        let m_hat = m_new / bias_correction1;
        let v_hat = v_new / bias_correction2;
        param[i] -= adam.lr * m_hat / (v_hat.sqrt() + adam.eps);
    }
    Ok(())
}

/// Runs the training primitives on host vectors.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

fn epilogue_slice<'a>(epilogue: Epilogue<'a, Vec<f32>>) -> Epilogue<'a, [f32]> {
    Epilogue { bias: epilogue.bias.map(Vec::as_slice), relu: epilogue.relu }
}

/// Stores a freshly computed result into the caller's output buffer, whose length must match.
fn store(op: &'static str, result: Vec<f32>, out: &mut Vec<f32>) -> Result<(), BackendError> {
    check_len(op, "output", result.len(), out.len())?;
    *out = result;
    Ok(())
}

impl Backend for CpuBackend {
    type Buffer = Vec<f32>;

    fn describe(&self) -> String {
        "cpu".to_string()
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>, BackendError> {
        Ok(host.to_vec())
    }

    fn write(&self, host: &[f32], buffer: &mut Vec<f32>) -> Result<(), BackendError> {
        check_len("write", "buffer", host.len(), buffer.len())?;
        buffer.copy_from_slice(host);
        Ok(())
    }

    fn download(&self, buffer: &Vec<f32>) -> Result<Vec<f32>, BackendError> {
        Ok(buffer.clone())
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0.0; len])
    }

    fn gemm_ab(
        &self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        dims: GemmDims,
        epilogue: Epilogue<'_, Vec<f32>>,
        c: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        let result = gemm_ab(a, b, dims.m, dims.k, dims.n, epilogue_slice(epilogue))?;
        store("gemm_ab", result, c)
    }

    fn gemm_atb(
        &self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        dims: GemmDims,
        epilogue: Epilogue<'_, Vec<f32>>,
        c: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        let result = gemm_atb(a, b, dims.m, dims.k, dims.n, epilogue_slice(epilogue))?;
        store("gemm_atb", result, c)
    }

    fn gemm_abt(
        &self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        dims: GemmDims,
        epilogue: Epilogue<'_, Vec<f32>>,
        c: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        let result = gemm_abt(a, b, dims.m, dims.k, dims.n, epilogue_slice(epilogue))?;
        store("gemm_abt", result, c)
    }

    fn relu_backward(
        &self,
        grad: &Vec<f32>,
        activation: &Vec<f32>,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        store("relu_backward", relu_backward(grad, activation)?, out)
    }

    fn mse_loss_and_grad(
        &self,
        pred: &Vec<f32>,
        target: &Vec<f32>,
        grad: &mut Vec<f32>,
    ) -> Result<f32, BackendError> {
        let (loss, result) = mse_loss_and_grad(pred, target)?;
        store("mse_loss_and_grad", result, grad)?;
        Ok(loss)
    }

    fn column_sums(
        &self,
        a: &Vec<f32>,
        rows: usize,
        cols: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        store("column_sums", column_sums(a, rows, cols)?, out)
    }

    fn adam_update(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        adam: &AdamConfig,
        step: u64,
    ) -> Result<(), BackendError> {
        Ok(adam_update(param, grad, m, v, adam, step)?)
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Shapes around and between multiples of the GPU's 32-wide tile, plus degenerate ones.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (1, 7, 1),
        (3, 1, 5),
        (31, 33, 32),
        (33, 17, 65),
        (64, 64, 64),
        (100, 3, 7),
        (5, 129, 2),
        (0, 4, 3),
    ];

    fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// C[i][j] = Σ_p A(i,p)·B(p,j) in f64 by the textbook triple loop, with accessors that hide
    /// the storage order, then bias and ReLU.
    fn naive(
        m: usize,
        k: usize,
        n: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
        bias: Option<&[f32]>,
        relu: bool,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0.0_f64;
                for p in 0..k {
                    sum += f64::from(a(i, p)) * f64::from(b(p, j));
                }
                if let Some(bias) = bias {
                    sum += f64::from(bias[j]);
                }
                c[i * n + j] = if relu { sum.max(0.0) } else { sum };
            }
        }
        c
    }

    fn assert_close(actual: &[f32], expected: &[f64], what: &str) {
        assert_eq!(actual.len(), expected.len(), "{what}: length");
        for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let tolerance = 1e-5 * (1.0 + e.abs());
            assert!((f64::from(a) - e).abs() <= tolerance, "{what}[{index}]: {a} vs {e}");
        }
    }

    #[test]
    fn gemms_match_a_naive_triple_loop() -> Result<(), OpError> {
        let mut rng = StdRng::seed_from_u64(7);
        for (m, k, n) in SHAPES {
            let bias = random(&mut rng, n);
            for (with_bias, relu) in [(false, false), (true, false), (false, true), (true, true)] {
                let epilogue = Epilogue { bias: with_bias.then_some(bias.as_slice()), relu };
                let what = format!("{m}x{k}x{n} bias={with_bias} relu={relu}");
                let a = random(&mut rng, m * k);
                let b = random(&mut rng, k * n);
                // A·B with A m x k, B k x n.
                let expected =
                    naive(m, k, n, |i, p| a[i * k + p], |p, j| b[p * n + j], epilogue.bias, relu);
                assert_close(
                    &gemm_ab(&a, &b, m, k, n, epilogue)?,
                    &expected,
                    &format!("ab {what}"),
                );
                // Aᵀ·B with A stored k x m.
                let expected =
                    naive(m, k, n, |i, p| a[p * m + i], |p, j| b[p * n + j], epilogue.bias, relu);
                assert_close(
                    &gemm_atb(&a, &b, m, k, n, epilogue)?,
                    &expected,
                    &format!("atb {what}"),
                );
                // A·Bᵀ with B stored n x k.
                let expected =
                    naive(m, k, n, |i, p| a[i * k + p], |p, j| b[j * k + p], epilogue.bias, relu);
                assert_close(
                    &gemm_abt(&a, &b, m, k, n, epilogue)?,
                    &expected,
                    &format!("abt {what}"),
                );
            }
        }
        Ok(())
    }

    #[test]
    fn gemms_reject_mismatched_shapes() {
        let a = vec![0.0; 6];
        let b = vec![0.0; 6];
        let bias = [0.0; 2];
        assert_eq!(
            gemm_ab(&a, &b, 2, 3, 3, Epilogue::none()),
            Err(OpError::Length { op: "gemm_ab", operand: "B", expected: 9, actual: 6 })
        );
        assert_eq!(
            gemm_atb(&a, &b, 2, 3, 2, Epilogue { bias: Some(&bias[..1]), relu: false }),
            Err(OpError::Length { op: "gemm_atb", operand: "bias", expected: 2, actual: 1 })
        );
        assert_eq!(
            gemm_abt(&a, &b, usize::MAX, 2, 2, Epilogue::none()),
            Err(OpError::Overflow { op: "gemm_abt" })
        );
        assert_eq!(mse_loss_and_grad(&[], &[]), Err(OpError::Empty { op: "mse_loss_and_grad" }));
        assert!(relu_backward(&a, &b[..5]).is_err());
        assert!(column_sums(&a, 4, 2).is_err());
    }

    #[test]
    fn elementwise_and_reductions_match_naive_loops() -> Result<(), OpError> {
        let mut rng = StdRng::seed_from_u64(11);
        for (rows, cols) in [(1, 1), (7, 3), (33, 65), (300, 2)] {
            let len = rows * cols;
            let grad = random(&mut rng, len);
            let activation: Vec<f32> =
                random(&mut rng, len).into_iter().map(|x| x.max(0.0)).collect();
            let masked = relu_backward(&grad, &activation)?;
            for i in 0..len {
                assert_eq!(masked[i], if activation[i] > 0.0 { grad[i] } else { 0.0 });
            }

            let sums = column_sums(&grad, rows, cols)?;
            let expected: Vec<f64> =
                (0..cols).map(|c| (0..rows).map(|r| f64::from(grad[r * cols + c])).sum()).collect();
            assert_close(&sums, &expected, "column_sums");

            let target = random(&mut rng, len);
            let (loss, mse_grad) = mse_loss_and_grad(&grad, &target)?;
            let expected_loss = grad
                .iter()
                .zip(&target)
                .map(|(&p, &t)| (f64::from(p) - f64::from(t)).powi(2))
                .sum::<f64>()
                / len as f64;
            assert_close(&[loss], &[expected_loss], "mse loss");
            let expected_grad: Vec<f64> = grad
                .iter()
                .zip(&target)
                .map(|(&p, &t)| 2.0 * (f64::from(p) - f64::from(t)) / len as f64)
                .collect();
            assert_close(&mse_grad, &expected_grad, "mse grad");
        }
        Ok(())
    }

    #[test]
    fn adam_matches_the_textbook_update() -> Result<(), OpError> {
        let mut rng = StdRng::seed_from_u64(13);
        let adam = AdamConfig { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let len = 37;
        let mut param = random(&mut rng, len);
        let (mut m, mut v) = (vec![0.0; len], vec![0.0; len]);
        let mut expected: Vec<f64> = param.iter().map(|&p| f64::from(p)).collect();
        let (mut m64, mut v64) = (vec![0.0_f64; len], vec![0.0_f64; len]);
        for step in 1..=5_u64 {
            let grad = random(&mut rng, len);
            adam_update(&mut param, &grad, &mut m, &mut v, &adam, step)?;
            for i in 0..len {
                let g = f64::from(grad[i]);
                m64[i] = 0.9 * m64[i] + 0.1 * g;
                v64[i] = 0.999 * v64[i] + 0.001 * g * g;
                let m_hat = m64[i] / (1.0 - 0.9_f64.powi(step as i32));
                let v_hat = v64[i] / (1.0 - 0.999_f64.powi(step as i32));
                expected[i] -= 0.01 * m_hat / (v_hat.sqrt() + 1e-8);
            }
        }
        assert_close(&param, &expected, "adam");
        assert_eq!(
            adam_update(&mut param, &[0.0; 37], &mut m, &mut v, &adam, 0),
            Err(OpError::AdamStepZero)
        );
        Ok(())
    }
}
