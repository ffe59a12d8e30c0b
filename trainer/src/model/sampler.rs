//! Picking the next token from the last position's logits, on the logits' device with no
//! host synchronisation (so a captured decode step can include it): greedy at temperature
//! 0, else softmax(logits / T) restricted to the top k and to the top-p nucleus, drawn by
//! the exponential race `argmax_i p_i / E_i` with `E_i ~ Exp(1)`, which picks i with
//! probability p_i (as a multinomial draw does) from a fixed number of random numbers. The
//! draws come from torch's default generator of the device: seed it for reproducible runs.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// How the next token is picked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    /// 0: greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: i64,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f64,
}

impl Sampler {
    pub const GREEDY: Sampler = Sampler {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };

    /// A named error for a setting that samples nothing sensible.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("temperature {} must be finite and >= 0", self.temperature);
        }
        if self.top_k < 0 {
            bail!("top-k {} must be >= 0 (0 keeps every token)", self.top_k);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!(
                "top-p {} must be in (0, 1] (1 keeps every token)",
                self.top_p
            );
        }
        Ok(())
    }

    /// `logits: [B, V]` -> `[B, 1]` int64.
    pub fn sample(&self, logits: &Tensor) -> Tensor {
        if self.temperature <= 0.0 {
            return logits.argmax(-1, true);
        }
        let probs = self
            .mask(&(logits.to_kind(Kind::Float) / self.temperature))
            .softmax(-1, Kind::Float);
        // Exp(1) draws, kept off 0 (a masked token's 0 / 0 would be a NaN, which argmax
        // would pick).
        let race = probs.empty_like().exponential_(1.0).clamp_min_(1e-30);
        (probs / race).argmax(-1, true)
    }

    /// Scaled logits `[B, V]` with the tokens outside the top k and outside the top-p
    /// nucleus set to -inf (the most likely token always stays).
    pub fn mask(&self, scaled: &Tensor) -> Tensor {
        let v = scaled.size()[1];
        let mut l = scaled.shallow_clone();
        if self.top_k > 0 && self.top_k < v {
            let (top, _) = l.topk(self.top_k, -1, true, true);
            let kth = top.narrow(1, self.top_k - 1, 1);
            l = l.masked_fill(&l.lt_tensor(&kth), f64::NEG_INFINITY);
        }
        if self.top_p < 1.0 {
            let (sorted, order) = l.sort(-1, true);
            let p = sorted.softmax(-1, Kind::Float);
            // A token stays while the mass of the tokens before it is below top_p.
            let before = p.cumsum(-1, Kind::Float) - &p;
            let drop = before.ge(self.top_p);
            let kept = sorted.masked_fill(&drop, f64::NEG_INFINITY);
            l = l.full_like(f64::NEG_INFINITY).scatter(-1, &order, &kept);
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn logits(rows: &[&[f32]]) -> Tensor {
        let v = rows[0].len() as i64;
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, v])
    }

    /// Which tokens a mask keeps, per row, written out the slow way: sort one row, then the
    /// k largest and the shortest prefix whose softmax mass reaches p.
    fn kept_reference(row: &[f32], top_k: usize, top_p: f64) -> Vec<bool> {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let k = if top_k == 0 { row.len() } else { top_k };
        let kept: Vec<usize> = order[..k].to_vec();
        let max = row[kept[0]] as f64;
        let z: f64 = kept.iter().map(|&i| (row[i] as f64 - max).exp()).sum();
        let mut out = vec![false; row.len()];
        let mut mass = 0.0;
        for &i in &kept {
            if mass >= top_p {
                break;
            }
            out[i] = true;
            mass += (row[i] as f64 - max).exp() / z;
        }
        out
    }

    #[test]
    fn top_k_and_top_p_masks_equal_the_written_out_rule() {
        tch::manual_seed(3);
        let l = Tensor::randn([6, 40], (Kind::Float, Device::Cpu)) * 2.0;
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|r| Vec::<f32>::try_from(l.get(r)).unwrap())
            .collect();
        for (top_k, top_p) in [
            (0, 0.9),
            (5, 1.0),
            (7, 0.5),
            (1, 0.3),
            (0, 1e-6),
            (40, 0.99),
        ] {
            let s = Sampler {
                temperature: 1.0,
                top_k,
                top_p,
            };
            let masked = s.mask(&l);
            for (r, row) in rows.iter().enumerate() {
                let got: Vec<bool> = Vec::<f32>::try_from(masked.get(r as i64))
                    .unwrap()
                    .iter()
                    .map(|x| x.is_finite())
                    .collect();
                let want = kept_reference(row, top_k as usize, top_p);
                assert_eq!(got, want, "top_k {top_k} top_p {top_p} row {r}");
            }
        }
    }

    #[test]
    fn greedy_is_argmax_and_samples_stay_in_the_kept_set() {
        let l = logits(&[&[0.0, 5.0, 4.0, -1.0, 3.0], &[9.0, 0.0, 8.5, 0.1, 0.2]]);
        let g = Sampler::GREEDY.sample(&l);
        assert_eq!(Vec::<i64>::try_from(g.view([-1])).unwrap(), [1, 0]);
        tch::manual_seed(1);
        let s = Sampler {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
        };
        for _ in 0..200 {
            let t = Vec::<i64>::try_from(s.sample(&l).view([-1])).unwrap();
            assert!(t[0] == 1 || t[0] == 2, "row 0 sampled {}", t[0]);
            assert!(t[1] == 0 || t[1] == 2, "row 1 sampled {}", t[1]);
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = |s: Sampler, word: &str| {
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        };
        let base = Sampler::GREEDY;
        bad(
            Sampler {
                temperature: -1.0,
                ..base
            },
            "temperature",
        );
        bad(
            Sampler {
                temperature: f64::NAN,
                ..base
            },
            "temperature",
        );
        bad(Sampler { top_k: -2, ..base }, "top-k");
        bad(Sampler { top_p: 0.0, ..base }, "top-p");
        bad(Sampler { top_p: 1.5, ..base }, "top-p");
        assert!(base.validate().is_ok());
    }
}
