//! Route definitions as configured (in `lmserve.toml` or through `Models.SetRoute`); how a
//! route picks an arm is `registry::routes`.

use serde::{Deserialize, Serialize};

use crate::error::Task;

/// One arm: a model (optionally pinned to a version) and its share of traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    /// "model" or "model@version".
    pub target: String,
    /// Relative share; arms with weight 0 get no traffic.
    pub weight: f64,
}

/// A copy of some requests goes here; its answers are recorded, never returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// "model" or "model@version".
    pub target: String,
    /// Share of requests copied, 0 to 100.
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The task every arm serves; requests for another task are refused.
    pub task: Task,
    pub arms: Vec<ArmConfig>,
    #[serde(default)]
    pub shadow: Option<ShadowConfig>,
}
