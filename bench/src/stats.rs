//! Small statistics over samples: median, percentiles, min and max.

use serde::Serialize;

/// Median with min–max of a set of samples.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Summary {
            median: percentile_sorted(&v, 50.0),
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        }
    }
}

/// The p-th percentile (0..=100) of sorted samples, by linear interpolation.
pub fn percentile_sorted(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0) * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, p)
}

pub fn median(samples: &[f64]) -> f64 {
    percentile(samples, 50.0)
}

/// The mean of the samples between the first and the third quartile (the
/// middle half, sorted): robust to outliers like the median, but not stuck
/// on the clock's grid. BPF_PROG_TEST_RUN reports a single run (repeat 1)
/// in steps of about 10 ns here, so the median of such runs jumps from one
/// step to the next, and two medians differ by a whole step or nothing.
pub fn interquartile_mean(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let (lo, hi) = (n / 4, n - n / 4);
    let mid = &v[lo..hi.max(lo + 1)];
    mid.iter().sum::<f64>() / mid.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_percentiles() {
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        assert_eq!(percentile(&[0.0, 10.0], 90.0), 9.0);
        assert!(Summary::of(&[]).n == 0);
    }

    #[test]
    fn interquartile_mean_averages_the_middle_half() {
        // Samples on a 10-ns grid, 60 % at 70 and 40 % at 80: the median is
        // 70, the middle half's mean lies between the steps.
        let mut v = vec![70.0; 60];
        v.extend([80.0; 40]);
        assert_eq!(median(&v), 70.0);
        let m = interquartile_mean(&v);
        assert!(m > 70.0 && m < 80.0, "{m}");
        // Outliers at either end do not move it.
        let mut w = vec![50.0; 10];
        w.extend([100.0; 20]);
        w.extend([10_000.0; 10]);
        assert_eq!(interquartile_mean(&w), 100.0);
        assert_eq!(interquartile_mean(&[5.0]), 5.0);
        assert!(interquartile_mean(&[]).is_nan());
    }
}
