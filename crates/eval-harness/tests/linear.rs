//! The linear layers: equal to the untransposed product, parts replaced in place, and the CPU
//! panel kernel's rows independent of their batch.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use eval_harness::models::linear::Lin;
use testkit::compare::max_abs_diff;

#[test]
fn matches_the_untransposed_product_and_replaces_parts_in_place() {
    let d = Device::Cpu;
    let rnd = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &d).unwrap();
    let (a, b, bias) = (rnd(&[300, 70]), rnd(&[20, 70]), rnd(&[300]));
    let vb = VarBuilder::from_tensors(
        [("m.a.weight", &a), ("m.a.bias", &bias), ("m.b.weight", &b)]
            .into_iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect(),
        DType::F32,
        &d,
    );
    let lin = Lin::load(&vb.pp("m"), &[("a", 300)], 70, true).unwrap();
    let x = rnd(&[2, 5, 70]);
    let reference = x
        .broadcast_matmul(&a.t().unwrap())
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    let y = lin.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 5, 300]);
    assert!(max_abs_diff(&y, &reference) < 1e-4);
    // Stacked parts: replacing one (after the panel copy was made) is exactly loading it.
    let mut stacked = Lin::load(&vb.pp("m"), &[("b", 20), ("a", 300)], 70, false).unwrap();
    let one_row = x.narrow(1, 0, 1).unwrap();
    stacked.forward(&one_row).unwrap();
    let a2 = rnd(&[300, 70]);
    assert!(stacked.set("m.a.weight", &a2).unwrap());
    assert!(!stacked.set("m.a.bias", &bias).unwrap());
    assert!(!stacked.set("m.c.weight", &a2).unwrap());
    let e = stacked.set("m.b.weight", &a2).unwrap_err();
    assert!(
        e.to_string().contains("`m.b.weight` has shape [300, 70]"),
        "{e}"
    );
    let vb2 = VarBuilder::from_tensors(
        [("m.a.weight", &a2), ("m.b.weight", &b)]
            .into_iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect(),
        DType::F32,
        &d,
    );
    let fresh = Lin::load(&vb2.pp("m"), &[("b", 20), ("a", 300)], 70, false).unwrap();
    for input in [&one_row, &x] {
        let (got, want) = (
            stacked.forward(input).unwrap(),
            fresh.forward(input).unwrap(),
        );
        assert_eq!(max_abs_diff(&got, &want), 0.0);
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_rows_product_does_not_depend_on_its_batch() {
    use eval_harness::models::panels::{Panels, SMALL_ROWS};

    // 93 columns: five full panels and a partial one.
    let (k, n) = (300, 93);
    let mut s = 7u32;
    let mut rnd = || {
        s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (s >> 8) as f32 / 16_777_216.0 - 0.5
    };
    let wt: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
    let x: Vec<f32> = (0..SMALL_ROWS * k).map(|_| rnd()).collect();
    let packed = Panels::pack(&wt, k, n);
    let Some(all) = packed.matmul(&x, SMALL_ROWS, k, n) else {
        // Without AVX2/FMA the kernel declines and candle's matmul is used instead.
        assert!(!std::arch::is_x86_feature_detected!("fma"));
        return;
    };
    for m in 1..=SMALL_ROWS {
        let part = packed.matmul(&x[..m * k], m, k, n).unwrap();
        for (i, (a, b)) in part.iter().zip(&all).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "batch of {m}: element {i}");
        }
    }
    for r in 0..SMALL_ROWS {
        for c in 0..n {
            let exact: f64 = (0..k)
                .map(|kk| x[r * k + kk] as f64 * wt[kk * n + c] as f64)
                .sum();
            assert!((all[r * n + c] as f64 - exact).abs() < 1e-4, "({r}, {c})");
        }
    }
}
