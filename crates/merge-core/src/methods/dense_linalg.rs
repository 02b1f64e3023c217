//! Dense linear algebra for the SVD-based merges and LoRA extraction: the glue between our
//! row-major f32 tensor data and the `faer` crate (blocked, multithreaded SVD), and the few
//! operations the methods share (thin SVD, truncation, orthogonal polar factor).
//!
//! Everything is f32: the merges' inputs and outputs are f32, and faer's f32 SVD is accurate to
//! a few ulps of the largest singular value, far inside the 1e-4 the parity tests allow, at
//! half the memory traffic of f64. A thin SVD of an m × n matrix costs O(m·n·min(m, n)).
//!
//! ```
//! use merge_core::methods::dense_linalg::{polar_factor, thin_svd, view_rows};
//! let a = [3.0f32, 0.0, 0.0, -2.0]; // 2 × 2, row-major
//! let svd = thin_svd(view_rows(&a, 2, 2)).unwrap();
//! assert!((svd.s[0] - 3.0).abs() < 1e-6 && (svd.s[1] - 2.0).abs() < 1e-6);
//! let p = polar_factor(view_rows(&a, 2, 2)).unwrap(); // diag(1, −1)
//! assert!((p[(0, 0)] - 1.0).abs() < 1e-6 && (p[(1, 1)] + 1.0).abs() < 1e-6);
//! ```

use faer::{Mat, MatRef};

pub use faer::Mat as DenseMat;

/// A thin SVD A = U·diag(s)·Vᵀ: U is m × k, V is n × k, k = min(m, n), `s` descending.
pub struct Svd {
    /// Left singular vectors, one per column.
    pub u: Mat<f32>,
    /// Singular values, nonnegative, in nonincreasing order.
    pub s: Vec<f32>,
    /// Right singular vectors, one per column.
    pub v: Mat<f32>,
}

/// Why a dense decomposition failed.
#[derive(Debug, thiserror::Error)]
pub enum DenseError {
    /// The SVD iteration did not converge (NaN or infinite inputs, in practice).
    #[error("the SVD did not converge (are there NaN or infinite values?)")]
    NoConvergence,
}

impl From<DenseError> for candle_core::Error {
    fn from(e: DenseError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// Row-major `data` (rows × cols) as a faer view, without copying.
pub fn view_rows(data: &[f32], rows: usize, cols: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(data, rows, cols)
}

/// The matrix's entries in row-major order (what tensors store).
pub fn to_rows(m: MatRef<'_, f32>) -> Vec<f32> {
    let (rows, cols) = m.shape();
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        out.extend(m.row(i).iter().copied());
    }
    out
}

/// Thin SVD of `a`.
pub fn thin_svd(a: MatRef<'_, f32>) -> Result<Svd, DenseError> {
    if a.has_nan() || !a.is_all_finite() {
        return Err(DenseError::NoConvergence);
    }
    let svd = a.thin_svd().map_err(|_| DenseError::NoConvergence)?;
    let s = svd.S().column_vector().iter().copied().collect();
    Ok(Svd {
        u: svd.U().to_owned(),
        s,
        v: svd.V().to_owned(),
    })
}

impl Svd {
    /// The leading `r` triplets (U[:, :r], s[:r], V[:, :r]).
    pub fn truncated(&self, r: usize) -> (MatRef<'_, f32>, &[f32], MatRef<'_, f32>) {
        let r = r.min(self.s.len());
        (
            self.u.as_ref().subcols(0, r),
            &self.s[..r],
            self.v.as_ref().subcols(0, r),
        )
    }

    /// The best rank-`r` approximation U_r·diag(s_r)·V_rᵀ.
    pub fn reconstruct(&self, r: usize) -> Mat<f32> {
        let (u, s, v) = self.truncated(r);
        scale_cols(u, s) * v.transpose()
    }
}

/// `m`·diag(`s`): column j of `m` times `s[j]`.
pub fn scale_cols(m: MatRef<'_, f32>, s: &[f32]) -> Mat<f32> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] * s[j])
}

/// The orthogonal polar factor of `a` (m × k, k ≤ m): with a = P·Σ·Qᵀ, P·Qᵀ, the matrix with
/// orthonormal columns nearest to `a` (Frobenius norm). TSV and Iso-CTS use it to whiten
/// stacked singular vectors. Unique when `a` has full column rank.
pub fn polar_factor(a: MatRef<'_, f32>) -> Result<Mat<f32>, DenseError> {
    let svd = thin_svd(a)?;
    Ok(&svd.u * svd.v.transpose())
}

/// Columns of `parts` side by side (all with the same row count).
pub fn hcat(parts: &[MatRef<'_, f32>]) -> Mat<f32> {
    let rows = parts.first().map_or(0, |p| p.nrows());
    let cols = parts.iter().map(|p| p.ncols()).sum();
    let mut out = Mat::zeros(rows, cols);
    let mut at = 0;
    for p in parts {
        out.as_mut().subcols_mut(at, p.ncols()).copy_from(p);
        at += p.ncols();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs(m: MatRef<'_, f32>) -> f32 {
        to_rows(m).iter().fold(0f32, |a, x| a.max(x.abs()))
    }

    #[test]
    fn svd_reconstructs_and_polar_is_orthonormal() {
        let (m, n) = (7, 4);
        let data: Vec<f32> = (0..m * n)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let a = view_rows(&data, m, n);
        let svd = thin_svd(a).unwrap();
        assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
        let back = svd.reconstruct(n);
        assert!(max_abs((&back - a).as_ref()) < 1e-5);
        assert_eq!(to_rows(back.as_ref()).len(), m * n);
        let p = polar_factor(a).unwrap();
        let gram = p.transpose() * &p;
        assert!(max_abs((&gram - Mat::<f32>::identity(n, n)).as_ref()) < 1e-5);
        let h = hcat(&[a.subcols(0, 1), a.subcols(1, 3)]);
        assert_eq!(to_rows(h.as_ref()), data);
    }

    #[test]
    fn non_finite_input_is_an_error() {
        let data = [1.0, f32::NAN, 0.0, 1.0];
        assert!(thin_svd(view_rows(&data, 2, 2)).is_err());
    }
}
