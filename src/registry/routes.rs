//! Routes: a name that resolves to weighted arms (model versions) and an optional shadow arm.
//! Sticky assignment hashes a key with weighted rendezvous hashing: a key keeps its arm while
//! the weights stay, every replica with the same routes agrees without sharing state, and a
//! weight change moves only the keys it must.

pub use crate::config::routes::{ArmConfig, RouteConfig, ShadowConfig};

impl RouteConfig {
    /// Checks what needs no registry: weights, percent, arm names. Returns the reason it is invalid.
    pub fn check_shape(&self) -> Result<(), String> {
        if self.arms.is_empty() {
            return Err("arms: a route needs at least one arm".into());
        }
        let mut seen = std::collections::HashSet::with_capacity(self.arms.len());
        for (index, arm) in self.arms.iter().enumerate() {
            if !(arm.weight >= 0.0 && arm.weight.is_finite()) {
                return Err(format!(
                    "arms[{index}].weight: must be a non-negative number; got {}",
                    arm.weight
                ));
            }
            if !seen.insert(arm.target.as_str()) {
                return Err(format!(
                    "arms[{index}].target: {} appears twice",
                    crate::error::echo(&arm.target)
                ));
            }
        }
        if !self.arms.iter().any(|arm| arm.weight > 0.0) {
            return Err("arms: at least one arm needs a positive weight".into());
        }
        if let Some(shadow) = &self.shadow
            && !(0.0..=100.0).contains(&shadow.percent)
        {
            return Err(format!(
                "shadow.percent: must be in [0, 100]; got {}",
                shadow.percent
            ));
        }
        Ok(())
    }

    /// The arm for `key` (sticky), or for the random number `draw` in [0, 1) when there is no key.
    pub fn pick(&self, key: Option<&str>, draw: f64) -> usize {
        match key {
            Some(key) => self
                .arms
                .iter()
                .enumerate()
                .filter(|(_, arm)| arm.weight > 0.0)
                .map(|(index, arm)| (index, rendezvous_score(key, &arm.target, arm.weight)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(0, |(index, _)| index),
            None => {
                let total: f64 = self.arms.iter().map(|arm| arm.weight).sum();
                let mut point = draw * total;
                for (index, arm) in self.arms.iter().enumerate() {
                    if arm.weight > 0.0 && point < arm.weight {
                        return index;
                    }
                    point -= arm.weight;
                }
                self.arms
                    .iter()
                    .rposition(|arm| arm.weight > 0.0)
                    .unwrap_or(0)
            }
        }
    }

    /// Whether this request is copied to the shadow arm: sticky by key, else by `draw` in [0, 1).
    pub fn shadowed(&self, key: Option<&str>, draw: f64) -> bool {
        let Some(shadow) = &self.shadow else {
            return false;
        };
        let point = match key {
            Some(key) => unit_interval(stable_hash(key.as_bytes(), b"shadow")),
            None => draw,
        };
        point * 100.0 < shadow.percent
    }

    /// The arm a pin header names, by target ("model@1") or by index ("0").
    pub fn pinned(&self, pin: &str) -> Option<usize> {
        self.arms
            .iter()
            .position(|arm| arm.target == pin)
            .or_else(|| pin.parse::<usize>().ok().filter(|&i| i < self.arms.len()))
    }
}

/// Weighted rendezvous score: the arm with the lowest score wins. `-ln(u) / w` is an
/// exponential draw with rate `w`, so an arm wins with probability `w / Σw`, and raising one
/// arm's weight only ever moves keys to that arm.
fn rendezvous_score(key: &str, arm: &str, weight: f64) -> f64 {
    let u = unit_interval(stable_hash(key.as_bytes(), arm.as_bytes()));
    -u.ln() / weight
}

/// A point strictly inside (0, 1) from 53 bits of the hash.
fn unit_interval(hash: u64) -> f64 {
    ((hash >> 11) as f64 + 0.5) / (1_u64 << 53) as f64
}

/// FNV-1a over key and salt, then a 64-bit finaliser (from splitmix64): stable across
/// processes, machines and releases, unlike the standard library's hasher.
pub fn stable_hash(key: &[u8], salt: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in key.iter().chain([0xff_u8].iter()).chain(salt) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::error::Task;

    fn route(weights: &[(&str, f64)]) -> RouteConfig {
        RouteConfig {
            task: Task::Embed,
            arms: weights
                .iter()
                .map(|(target, weight)| ArmConfig {
                    target: target.to_string(),
                    weight: *weight,
                })
                .collect(),
            shadow: None,
        }
    }

    fn keys() -> impl Iterator<Item = String> {
        (0..10_000).map(|i| format!("user-{i}"))
    }

    #[test]
    fn keyed_split_follows_the_weights() {
        let route = route(&[("a@1", 70.0), ("b@1", 20.0), ("c@1", 10.0)]);
        let mut counts = [0_usize; 3];
        for key in keys() {
            counts[route.pick(Some(&key), 0.0)] += 1;
        }
        for (count, weight) in counts.iter().zip([0.7, 0.2, 0.1]) {
            let share = *count as f64 / 10_000.0;
            assert!(
                (share - weight).abs() < 0.02,
                "share {share} for weight {weight}: {counts:?}"
            );
        }
    }

    #[test]
    fn a_weight_change_moves_only_the_keys_it_must() {
        let before = route(&[("a@1", 90.0), ("b@1", 10.0)]);
        let after = route(&[("a@1", 80.0), ("b@1", 20.0)]);
        let moved = keys()
            .filter(|key| before.pick(Some(key), 0.0) != after.pick(Some(key), 0.0))
            .count();
        let share = moved as f64 / 10_000.0;
        assert!((0.08..=0.12).contains(&share), "moved {share}");
        // Every moved key went to the arm whose weight grew.
        assert!(keys().all(
            |key| before.pick(Some(&key), 0.0) == after.pick(Some(&key), 0.0)
                || after.pick(Some(&key), 0.0) == 1
        ));
    }

    #[test]
    fn assignment_is_sticky_and_keyless_draws_split_by_weight() {
        let route = route(&[("a@1", 50.0), ("b@1", 0.0), ("c@1", 50.0)]);
        for key in keys().take(100) {
            let arm = route.pick(Some(&key), 0.0);
            assert_ne!(arm, 1, "weight 0 gets nothing");
            assert!((0..5).all(|_| route.pick(Some(&key), 0.0) == arm));
        }
        assert_eq!(route.pick(None, 0.2), 0);
        assert_eq!(route.pick(None, 0.7), 2);
    }

    #[test]
    fn shapes_are_checked() {
        assert!(
            route(&[("a", 0.0)])
                .check_shape()
                .unwrap_err()
                .contains("positive")
        );
        assert!(
            route(&[("a", -1.0), ("b", 1.0)])
                .check_shape()
                .unwrap_err()
                .contains("arms[0].weight")
        );
        assert!(
            route(&[("a", 1.0), ("a", 1.0)])
                .check_shape()
                .unwrap_err()
                .contains("twice")
        );
        assert!(route(&[]).check_shape().is_err());
        let mut shadowed = route(&[("a", 1.0)]);
        shadowed.shadow = Some(ShadowConfig {
            target: "b".into(),
            percent: 101.0,
        });
        assert!(
            shadowed
                .check_shape()
                .unwrap_err()
                .contains("shadow.percent")
        );
    }

    #[test]
    fn the_hash_is_stable() {
        // Fixed values: a change here would reshuffle every running experiment.
        assert_eq!(stable_hash(b"user-1", b"a@1"), 0x9a63_4125_ed14_30b9);
        assert_eq!(stable_hash(b"", b""), 0x4f2d_b50f_1240_40cd);
    }

    #[test]
    fn pins_by_target_or_index() {
        let route = route(&[("a@1", 1.0), ("b@2", 1.0)]);
        assert_eq!(route.pinned("b@2"), Some(1));
        assert_eq!(route.pinned("0"), Some(0));
        assert_eq!(route.pinned("7"), None);
    }
}
