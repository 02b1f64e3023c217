//! The linear algebra of the `svd` adapter merge: thin QR and a one-sided Jacobi SVD in f64,
//! on the small matrices of LoRA factors (ranks in the tens), so no LAPACK is needed.

use candle_core::{DType, Device, Tensor};

/// Row-major f64 copy of a 2-D tensor.
fn to_rows(t: &Tensor) -> candle_core::Result<(usize, usize, Vec<f64>)> {
    let (r, c) = t.dims2()?;
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok((r, c, v))
}

/// Thin QR of an n × k row-major matrix by modified Gram–Schmidt with one re-orthogonalisation
/// pass (accurate to machine precision for the small k of LoRA ranks). Returns (Q n × k, R
/// k × k, both row-major); a dependent column gets a zero Q column and a zero R row.
fn thin_qr(n: usize, k: usize, m: &[f64]) -> (Vec<f64>, Vec<f64>) {
    // columns
    let mut q: Vec<Vec<f64>> = (0..k)
        .map(|j| (0..n).map(|i| m[i * k + j]).collect())
        .collect();
    let mut r = vec![0f64; k * k];
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for j in 0..k {
        let original = dot(&q[j], &q[j]).sqrt();
        for _pass in 0..2 {
            for p in 0..j {
                let c = dot(&q[p], &q[j]);
                r[p * k + j] += c;
                let (head, tail) = q.split_at_mut(j);
                for (x, y) in tail[0].iter_mut().zip(&head[p]) {
                    *x -= c * y;
                }
            }
        }
        let norm = dot(&q[j], &q[j]).sqrt();
        if norm <= 1e-12 * original.max(f64::MIN_POSITIVE) || norm == 0.0 {
            q[j].iter_mut().for_each(|x| *x = 0.0);
        } else {
            r[j * k + j] = norm;
            q[j].iter_mut().for_each(|x| *x /= norm);
        }
    }
    let mut qm = vec![0f64; n * k];
    for (j, col) in q.iter().enumerate() {
        for (i, v) in col.iter().enumerate() {
            qm[i * k + j] = *v;
        }
    }
    (qm, r)
}

/// SVD of a small k × k row-major matrix by one-sided Jacobi: returns (U, σ, V) with U and V
/// row-major k × k and σ in descending order.
pub fn jacobi_svd(k: usize, m: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    // Work on columns of A (A = M), rotating pairs until all columns are orthogonal.
    let mut a: Vec<Vec<f64>> = (0..k)
        .map(|j| (0..k).map(|i| m[i * k + j]).collect())
        .collect();
    let mut v: Vec<Vec<f64>> = (0..k)
        .map(|j| (0..k).map(|i| f64::from(u8::from(i == j))).collect())
        .collect();
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..k {
            for q in p + 1..k {
                let alpha: f64 = a[p].iter().map(|x| x * x).sum();
                let beta: f64 = a[q].iter().map(|x| x * x).sum();
                let gamma: f64 = a[p].iter().zip(&a[q]).map(|(x, y)| x * y).sum();
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for mat in [&mut a, &mut v] {
                    let (lo, hi) = mat.split_at_mut(q);
                    for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                        let (xv, yv) = (*x, *y);
                        *x = c * xv - s * yv;
                        *y = s * xv + c * yv;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let sigma: Vec<f64> = a
        .iter()
        .map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&i, &j| sigma[j].total_cmp(&sigma[i]));
    let mut u = vec![0f64; k * k];
    let mut vv = vec![0f64; k * k];
    let mut s = vec![0f64; k];
    for (new, &old) in order.iter().enumerate() {
        s[new] = sigma[old];
        for i in 0..k {
            u[i * k + new] = if sigma[old] > 0.0 {
                a[old][i] / sigma[old]
            } else {
                0.0
            };
            vv[i * k + new] = v[old][i];
        }
    }
    (u, s, vv)
}

/// The best rank-`rank` factors (B', A') of B·A (B: out × R, A: R × in), padded with zero
/// directions when B·A has lower rank.
pub fn truncated_svd(b: &Tensor, a: &Tensor, rank: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let (out, k, bm) = to_rows(b)?;
    let (_, inn, am) = to_rows(a)?;
    // Aᵀ as in × k
    let mut at = vec![0f64; inn * k];
    for i in 0..k {
        for j in 0..inn {
            at[j * k + i] = am[i * inn + j];
        }
    }
    let (qb, rb) = thin_qr(out, k, &bm);
    let (qa, ra) = thin_qr(inn, k, &at);
    // core = R_b · R_aᵀ
    let mut core = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..k {
            core[i * k + j] = (0..k).map(|l| rb[i * k + l] * ra[j * k + l]).sum();
        }
    }
    let (u, s, v) = jacobi_svd(k, &core);
    let keep = rank.min(k);
    let mut new_b = vec![0f32; out * rank];
    let mut new_a = vec![0f32; rank * inn];
    for c in 0..keep {
        let root = s[c].sqrt();
        for i in 0..out {
            let x: f64 = (0..k).map(|l| qb[i * k + l] * u[l * k + c]).sum();
            new_b[i * rank + c] = (x * root) as f32;
        }
        for j in 0..inn {
            let y: f64 = (0..k).map(|l| qa[j * k + l] * v[l * k + c]).sum();
            new_a[c * inn + j] = (y * root) as f32;
        }
    }
    Ok((
        Tensor::from_vec(new_b, (out, rank), &Device::Cpu)?,
        Tensor::from_vec(new_a, (rank, inn), &Device::Cpu)?,
    ))
}
