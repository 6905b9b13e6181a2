//! Vector helpers shared by the CPU kernels and the sampler: AVX2 where the CPU has it,
//! plain loops otherwise (and in tests, to compare against).

/// Whether the CPU has AVX2, FMA and F16C (checked once).
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The largest element (-inf for an empty slice).
pub fn max(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 (checked).
        return unsafe { avx2::max(xs) };
    }
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Replaces each `x` by `e^((x - shift) * scale)` and returns their sum. With `shift` the
/// maximum and `scale` positive, every argument is at most 0 (softmax's numerators).
pub fn exp_sum(xs: &mut [f32], shift: f32, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { avx2::exp_sum(xs, shift, scale) };
    }
    exp_sum_scalar(xs, shift, scale)
}

fn exp_sum_scalar(xs: &mut [f32], shift: f32, scale: f32) -> f32 {
    let mut sum = 0f32;
    for x in xs.iter_mut() {
        *x = ((*x - shift) * scale).exp();
        sum += *x;
    }
    sum
}

/// Softmax in place.
pub fn softmax(xs: &mut [f32]) {
    let sum = exp_sum(xs, max(xs), 1.0);
    normalize(xs, sum);
}

/// Softmax in place, without vector instructions (the reference the kernels are tested
/// against).
pub(crate) fn softmax_scalar(xs: &mut [f32]) {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_sum_scalar(xs, m, 1.0);
    normalize(xs, sum);
}

fn normalize(xs: &mut [f32], sum: f32) {
    let inv = 1.0 / sum;
    xs.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// e^x, arguments clamped to [-87, 88] (e^88 is near f32's largest), Cephes'
    /// polynomial: within a few ulp of libm.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(
            _mm256_mul_ps(p, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }

    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn max(xs: &[f32]) -> f32 {
        let body = xs.len() - xs.len() % 8;
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..body).step_by(8) {
            m = _mm256_max_ps(m, _mm256_loadu_ps(xs.as_ptr().add(i)));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes
            .iter()
            .chain(&xs[body..])
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(xs: &mut [f32], shift: f32, scale: f32) -> f32 {
        let body = xs.len() - xs.len() % 8;
        let p = xs.as_mut_ptr();
        let (sh, sc) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
        let mut sum = _mm256_setzero_ps();
        for i in (0..body).step_by(8) {
            let e = exp(_mm256_mul_ps(
                _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), sh),
                sc,
            ));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
        }
        hsum(sum) + super::exp_sum_scalar(&mut xs[body..], shift, scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_exp_is_close_to_libm() {
        let mut x = -100.0f32;
        while x <= 0.0 {
            let xs: Vec<f32> = (0..37).map(|i| (x + i as f32 * 0.0137).min(0.0)).collect();
            let mut got = xs.clone();
            let sum = exp_sum(&mut got, 0.0, 1.0);
            let mut want = xs.clone();
            let want_sum = exp_sum_scalar(&mut want, 0.0, 1.0);
            for ((g, w), x) in got.iter().zip(&want).zip(&xs) {
                assert!(
                    (g - w).abs() <= 4.0 * f32::EPSILON * w + 1e-37,
                    "exp({x}) = {g}, libm {w}"
                );
            }
            assert!((sum - want_sum).abs() <= 1e-5 * want_sum + 1e-36);
            x += 0.11;
        }
    }

    #[test]
    fn softmax_and_max() {
        let mut xs: Vec<f32> = (0..21).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&xs), m);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let want: Vec<f32> = {
            let e: Vec<f32> = xs.iter().map(|x| (x - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        softmax(&mut xs);
        for (g, w) in xs.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
