//! R1-SGG's node matching: predicted objects paired one-to-one with
//! ground-truth objects by the Hungarian algorithm, on a cost mixing label
//! similarity, GIoU and L1.

use super::labels::{similarity, LabelSimilarity, Labels};
use crate::data::scene::{giou, l1, SceneGraph};

/// Minimum-cost one-to-one assignment (Kuhn-Munkres with potentials,
/// `O(n^2 m)` for `n = min(rows, cols)`, `m = max(rows, cols)`), for a
/// row-major `[rows, cols]` cost matrix: `min(rows, cols)` pairs
/// `(row, col)`, sorted by row, minimizing the summed cost. `None` if
/// `cost` has the wrong length or a non-finite value.
pub fn hungarian(cost: &[f64], rows: usize, cols: usize) -> Option<Vec<(usize, usize)>> {
    if rows.checked_mul(cols) != Some(cost.len()) || cost.iter().any(|c| !c.is_finite()) {
        return None;
    }
    if rows > cols {
        let transposed: Vec<f64> = (0..cols * rows)
            .map(|k| cost[(k % rows) * cols + k / rows])
            .collect();
        let mut pairs: Vec<(usize, usize)> = hungarian(&transposed, cols, rows)?
            .into_iter()
            .map(|(c, r)| (r, c))
            .collect();
        pairs.sort_unstable();
        return Some(pairs);
    }
    // Rows 1..=n are added one at a time; column 0 is a virtual start.
    // u, v: dual potentials; owner[j]: row holding column j (0 = free);
    // way[j]: previous column on the shortest augmenting path to j.
    let (n, m) = (rows, cols);
    let a = |i: usize, j: usize| cost[(i - 1) * m + (j - 1)];
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; m + 1];
    let mut owner = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    for i in 1..=n {
        owner[0] = i;
        let mut j0 = 0;
        let mut min_slack = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = owner[j0];
            let (mut delta, mut j1) = (f64::INFINITY, 0);
            for j in 1..=m {
                if !used[j] {
                    let slack = a(i0, j) - u[i0] - v[j];
                    if slack < min_slack[j] {
                        min_slack[j] = slack;
                        way[j] = j0;
                    }
                    if min_slack[j] < delta {
                        delta = min_slack[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[owner[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_slack[j] -= delta;
                }
            }
            j0 = j1;
            if owner[j0] == 0 {
                break;
            }
        }
        // Flip the augmenting path.
        while j0 != 0 {
            let prev = way[j0];
            owner[j0] = owner[prev];
            j0 = prev;
        }
    }
    let mut pairs: Vec<(usize, usize)> = (1..=m)
        .filter(|&j| owner[j] != 0)
        .map(|j| (owner[j] - 1, j - 1))
        .collect();
    pairs.sort_unstable();
    Some(pairs)
}

/// Weights of the node-matching cost `semantic (1 - sim) + giou (1 - GIoU)
/// + l1 L1` (R1-SGG: 1, 2, 5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchCost {
    /// Weight of the label dissimilarity.
    pub semantic: f64,
    /// Weight of `1 - GIoU`.
    pub giou: f64,
    /// Weight of the summed coordinate error.
    pub l1: f64,
}

impl Default for MatchCost {
    fn default() -> Self {
        Self {
            semantic: 1.0,
            giou: 2.0,
            l1: 5.0,
        }
    }
}

/// A predicted object matched to a ground-truth object.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeMatch {
    /// Index in the predicted graph.
    pub pred: usize,
    /// Index in the ground truth.
    pub gt: usize,
    /// Similarity of their categories.
    pub similarity: f64,
}

/// The Hungarian node matching of R1-SGG: `min(|P|, |g|)` pairs of least
/// total [`MatchCost`]. Empty if a cost weight is not finite.
pub fn match_objects(
    pred: &SceneGraph,
    gt: &SceneGraph,
    sim: &dyn LabelSimilarity,
    cost: &MatchCost,
) -> Vec<NodeMatch> {
    match_labels(&Labels::new(pred), &Labels::new(gt), sim, cost)
}

pub(crate) fn match_labels(
    pred: &Labels,
    gt: &Labels,
    sim: &dyn LabelSimilarity,
    cost: &MatchCost,
) -> Vec<NodeMatch> {
    let (np, ng) = (pred.categories.len(), gt.categories.len());
    let mut sims = Vec::with_capacity(np * ng);
    let mut costs = Vec::with_capacity(np * ng);
    for p in 0..np {
        for g in 0..ng {
            let s = similarity(sim, &pred.categories[p], &gt.categories[g]);
            let (bp, bg) = (pred.bbox(p), gt.bbox(g));
            sims.push(s);
            costs.push(cost.semantic * (1.0 - s) + cost.giou * (1.0 - giou(bp, bg)) + cost.l1 * l1(bp, bg));
        }
    }
    hungarian(&costs, np, ng)
        .unwrap_or_default()
        .into_iter()
        .map(|(p, g)| NodeMatch {
            pred: p,
            gt: g,
            similarity: sims[p * ng + g],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;
    use proptest::prelude::*;

    /// Minimum total cost over every injective assignment, by brute force.
    fn brute_force(cost: &[f64], rows: usize, cols: usize) -> f64 {
        fn go(cost: &[f64], rows: usize, cols: usize, r: usize, used: &mut Vec<bool>) -> f64 {
            if r == rows {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            // With more rows than columns a row may stay unassigned, as
            // long as enough rows remain to fill every column.
            let assigned = used.iter().filter(|u| **u).count();
            if rows - r > cols - assigned {
                best = go(cost, rows, cols, r + 1, used);
            }
            for c in 0..cols {
                if !used[c] {
                    used[c] = true;
                    best = best.min(cost[r * cols + c] + go(cost, rows, cols, r + 1, used));
                    used[c] = false;
                }
            }
            best
        }
        go(cost, rows, cols, 0, &mut vec![false; cols])
    }

    proptest! {
        #[test]
        fn hungarian_is_optimal(
            rows in 0usize..6,
            cols in 0usize..6,
            seed in any::<u64>(),
            integer in any::<bool>(),
        ) {
            let mut rng = Rng::new(seed);
            // Small integers make ties, which the potentials must handle.
            let cost: Vec<f64> = (0..rows * cols)
                .map(|_| if integer { rng.below(4) as f64 } else { rng.range(-10.0, 10.0) as f64 })
                .collect();
            let pairs = hungarian(&cost, rows, cols).unwrap();
            prop_assert_eq!(pairs.len(), rows.min(cols));
            let mut rows_seen: Vec<usize> = pairs.iter().map(|p| p.0).collect();
            let mut cols_seen: Vec<usize> = pairs.iter().map(|p| p.1).collect();
            rows_seen.dedup();
            cols_seen.sort();
            cols_seen.dedup();
            prop_assert_eq!(rows_seen.len(), pairs.len());
            prop_assert_eq!(cols_seen.len(), pairs.len());
            prop_assert!(pairs.iter().all(|&(r, c)| r < rows && c < cols));
            let total: f64 = pairs.iter().map(|&(r, c)| cost[r * cols + c]).sum();
            let best = brute_force(&cost, rows, cols);
            prop_assert!((total - best).abs() < 1e-9, "{} vs {}", total, best);
        }
    }

    #[test]
    fn hungarian_refuses_bad_matrices() {
        assert_eq!(hungarian(&[1.0, 2.0], 2, 2), None);
        assert_eq!(hungarian(&[1.0, f64::NAN], 1, 2), None);
        assert_eq!(hungarian(&[f64::INFINITY], 1, 1), None);
        assert_eq!(hungarian(&[], 0, 3), Some(vec![]));
        // A 1x3 row takes its cheapest column; a 3x1 column its cheapest row.
        assert_eq!(hungarian(&[3.0, 1.0, 2.0], 1, 3), Some(vec![(0, 1)]));
        assert_eq!(hungarian(&[3.0, 1.0, 2.0], 3, 1), Some(vec![(1, 0)]));
    }
}
