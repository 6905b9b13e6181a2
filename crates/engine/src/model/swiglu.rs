//! The feed-forward activation, `act(gate) * up`, as one CPU op over the stacked gate/up
//! projection [T, 2 I] -> [T, I]: candle's version is a strided activation (a scalar `exp`
//! or `tanh` per element), then a strided multiply, together a twentieth of a batched step
//! (GELU's `tanhf`, a seventh of Gemma's prompt processing) while the thread pool waited.
//!
//! Both activations are `x * sigmoid(z(x))`: SiLU with z = x, GELU's tanh approximation
//! (`0.5 x (1 + tanh(u))`, u = sqrt(2/pi) (x + 0.044715 x^3)) with z = 2u, since
//! 0.5 (1 + tanh(u)) = sigmoid(2u); one vector `exp` serves both.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, candle's `gelu`).
    GeluTanh,
}

pub struct SwiGlu {
    /// The intermediate size I: gate is columns 0..I, up is I..2I.
    pub width: usize,
    pub act: Activation,
}

/// 2 sqrt(2 / pi), and times GELU's cubic coefficient.
const GELU_Z1: f32 = 1.595_769_2;
const GELU_Z3: f32 = GELU_Z1 * 0.044_715;

/// `out[k] = act(gate[k]) * up[k]`.
pub fn swiglu_row(act: Activation, gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { swiglu_avx2(act, gate, up, out) };
    }
    swiglu_scalar(act, gate, up, out)
}

fn swiglu_scalar(act: Activation, gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let z = match act {
            Activation::Silu => g,
            Activation::GeluTanh => g * (GELU_Z1 + GELU_Z3 * g * g),
        };
        *o = g / (1.0 + (-z).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(act: Activation, gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(gate.len()).min(up.len());
    let body = n - n % 8;
    let one = _mm256_set1_ps(1.0);
    let (z1, z3) = (_mm256_set1_ps(GELU_Z1), _mm256_set1_ps(GELU_Z3));
    for k in (0..body).step_by(8) {
        let g = _mm256_loadu_ps(gate.as_ptr().add(k));
        let u = _mm256_loadu_ps(up.as_ptr().add(k));
        let z = match act {
            Activation::Silu => g,
            Activation::GeluTanh => _mm256_mul_ps(g, _mm256_fmadd_ps(z3, _mm256_mul_ps(g, g), z1)),
        };
        let e = crate::simd::avx2::exp(_mm256_sub_ps(_mm256_setzero_ps(), z));
        let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out.as_mut_ptr().add(k), _mm256_mul_ps(s, u));
    }
    swiglu_scalar(act, &gate[body..n], &up[body..n], &mut out[body..n]);
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "forgeline-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let i = self.width;
        let (rows, cols) = l.shape().dims2()?;
        if cols != 2 * i {
            candle_core::bail!("swiglu: expected {} columns, got {cols}", 2 * i)
        }
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("swiglu: input must be contiguous")
        };
        let x = &s.as_slice::<f32>()?[a..b];
        let mut out = vec![0f32; rows * i];
        let out_ptr = out.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
            for r in range {
                let row = &x[r * 2 * i..(r + 1) * 2 * i];
                // SAFETY: each row's `i` outputs are written by the one item that owns it.
                let o =
                    unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(r * i), i) };
                swiglu_row(self.act, &row[..i], &row[i..], o);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, i))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_swiglu_matches_scalar() {
        let gate: Vec<f32> = (0..203)
            .map(|k| (k as f32 * 0.37).sin() * 12.0 - 1.0)
            .collect();
        let up: Vec<f32> = (0..203).map(|k| (k as f32 * 0.11).cos() * 3.0).collect();
        for act in [Activation::Silu, Activation::GeluTanh] {
            let (mut fast, mut slow) = (vec![0f32; 203], vec![0f32; 203]);
            swiglu_row(act, &gate, &up, &mut fast);
            swiglu_scalar(act, &gate, &up, &mut slow);
            for (k, (f, s)) in fast.iter().zip(&slow).enumerate() {
                assert!(
                    (f - s).abs() <= 1e-5 * s.abs().max(1.0),
                    "{act:?} {k}: {f} vs {s}"
                );
            }
            // Large arguments either way: act(-100) is -0, act(100) is 100.
            let mut o = [0f32; 8];
            swiglu_row(act, &[-100.0; 8], &[1.0; 8], &mut o);
            assert!(o.iter().all(|v| v.abs() < 1e-30), "{o:?}");
            swiglu_row(act, &[100.0; 8], &[1.0; 8], &mut o);
            assert!(o.iter().all(|v| (v - 100.0).abs() < 1e-4), "{o:?}");
        }
    }

    #[test]
    fn gelu_is_the_tanh_approximation() {
        for k in 0..400 {
            let x = (k as f32 - 200.0) / 25.0;
            let want = 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh());
            let mut got = [0f32; 1];
            swiglu_scalar(Activation::GeluTanh, &[x], &[1.0], &mut got);
            assert!(
                (got[0] - want).abs() <= 2e-6 * want.abs().max(1.0),
                "{x}: {} vs {want}",
                got[0]
            );
        }
    }
}
