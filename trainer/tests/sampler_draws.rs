//! The sampler's random draws, in a test binary of their own: they seed torch's global
//! generator and then draw from it, which other tests running in parallel threads of the same
//! binary would interleave with.
use sparse_train::model::Sampler;
use tch::{Kind, Tensor};

/// The exponential race draws each token with its softmax probability: 40,000 draws over
/// p = softmax(log [0.5, 0.3, 0.15, 0.05]) land within 1.5 points of p (about 6 standard
/// deviations), one seed gives one sequence, and another seed another.
#[test]
fn draws_follow_the_softmax_and_a_seed_repeats_them() {
    let p = [0.5f64, 0.3, 0.15, 0.05];
    let l = Tensor::from_slice(&p.map(|x| x.ln() as f32))
        .view([1, 4])
        .repeat([40_000, 1]);
    let s = Sampler {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    tch::manual_seed(11);
    let a = s.sample(&l);
    tch::manual_seed(11);
    let b = s.sample(&l);
    assert!(a.equal(&b), "one seed, two sequences");
    tch::manual_seed(12);
    assert!(!s.sample(&l).equal(&a), "two seeds, one sequence");
    let counts = Vec::<i64>::try_from(a.view([-1]).bincount::<Tensor>(None, 4)).unwrap();
    for (i, &want) in p.iter().enumerate() {
        let got = counts[i] as f64 / 40_000.0;
        assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
    }
    // Temperature sharpens: at T = 0.25 the probabilities go as p^4 (token 0: 0.879).
    let cold = Sampler {
        temperature: 0.25,
        ..s
    };
    let top = cold
        .sample(&l)
        .eq(0)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    let want = p[0].powi(4) / p.iter().map(|x| x.powi(4)).sum::<f64>();
    assert!(
        (top - want).abs() < 0.015,
        "T = 0.25: token 0 drawn {top}, want {want}"
    );
}
