//! The route table as requests see it: the per-request choice of a route's arm and shadow, and
//! which routes use a model version. Changing the table is `route_changes`.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use super::{ModelVersion, Registry, RouteTable, parse_target};
use crate::config::routes::ArmConfig;
use crate::error::{Error, Result, Task};
use crate::telemetry::metrics;

/// What a request brings to routing: its sticky key and an optional pinned arm.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteRequest<'a> {
    pub key: Option<&'a str>,
    pub pin: Option<&'a str>,
}

/// The route and arm that chose a model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChoice {
    pub route: String,
    pub arm: String,
}

/// A copy of the request to send to a shadow arm, with the permit that bounds how many run.
pub struct Shadow {
    pub model: Arc<ModelVersion>,
    pub route: String,
    pub arm: String,
    pub permit: OwnedSemaphorePermit,
    /// Whether the shadow's version is also one of the route's arms: its copies queue with
    /// the route's own requests, so one starts only once the request it copies has queued.
    pub queues_with_arms: bool,
}

pub struct Routed {
    pub model: Arc<ModelVersion>,
    pub choice: Option<RouteChoice>,
    pub shadow: Option<Shadow>,
}

impl Registry {
    /// The route or model name `target` refers to, when the server knows it: the label of a
    /// request refused before routing. Unknown names give `None`, so a client cannot grow the
    /// metrics' label sets by sending made-up names.
    pub fn known_name(&self, target: &str) -> Option<String> {
        let target = target.trim();
        if self
            .routes
            .read()
            .expect("routes lock")
            .contains_key(target)
        {
            return Some(target.to_owned());
        }
        let (name, _) = parse_target(target).ok()?;
        self.model_slots(name).map(|_| name.to_owned())
    }

    /// Resolves `target` — a route or a model — for `task`.
    pub fn route(&self, target: &str, task: Task, request: RouteRequest<'_>) -> Result<Routed> {
        let route = self
            .routes
            .read()
            .expect("routes lock")
            .get(target.trim())
            .map(|entry| entry.route.clone());
        let Some(route) = route else {
            return Ok(Routed {
                model: self.resolve(target, Some(task))?,
                choice: None,
                shadow: None,
            });
        };
        let name = target.trim().to_owned();
        if route.task != task {
            return Err(Error::TaskNotServed {
                model: format!("route {name}"),
                version: "-".into(),
                task,
                served: route.task.to_string(),
            });
        }
        let arm = match request.pin {
            Some(pin) => route.pinned(pin).ok_or_else(|| {
                let arms: Vec<&str> = route.arms.iter().map(|arm| arm.target.as_str()).collect();
                Error::invalid(
                    &self.config.routing.pin_header,
                    format!(
                        "{} is not an arm of route `{name}`; arms: {arms:?}",
                        crate::error::echo(pin)
                    ),
                )
            })?,
            None => route.pick(request.key, rand::random::<f64>()),
        };
        let arm_target = route.arms[arm].target.clone();
        let model = self.resolve(&arm_target, Some(task))?;
        let shadow = match &route.shadow {
            Some(shadow) if route.shadowed(request.key, rand::random::<f64>()) => {
                self.shadow_for(&name, &shadow.target, &route.arms, task)
            }
            _ => None,
        };
        Ok(Routed {
            model,
            choice: Some(RouteChoice {
                route: name,
                arm: arm_target,
            }),
            shadow,
        })
    }

    fn shadow_for(
        &self,
        route: &str,
        target: &str,
        arms: &[ArmConfig],
        task: Task,
    ) -> Option<Shadow> {
        let Ok(permit) = Arc::clone(&self.shadow_permits).try_acquire_owned() else {
            metrics::shadow_finished(route, target, "dropped");
            return None;
        };
        match self.resolve(target, Some(task)) {
            // Where the shadow's version is also one of the route's arms (a setting tried on
            // the version itself), a copy would queue with the route's own requests: it is
            // dropped while that version has work waiting. A shadow of its own sees only copies
            // and queues them as they come.
            Ok(model) if is_an_arm(&model, arms) && model.engine.waiting() > 0 => {
                metrics::shadow_finished(route, target, "busy");
                None
            }
            Ok(model) => Some(Shadow {
                queues_with_arms: is_an_arm(&model, arms),
                model,
                route: route.to_owned(),
                arm: target.to_owned(),
                permit,
            }),
            Err(error) => {
                tracing::warn!(route, shadow = target, %error, "shadow arm unavailable");
                metrics::shadow_finished(route, target, error.kind());
                None
            }
        }
    }

    /// The first route that uses `model` at one of `versions`, or by bare name where no other
    /// version would be left to serve the route's task (`none_left`). The caller holds
    /// `route_edits` across the check and the removal it allows, so that no route can come to
    /// use what goes in between.
    pub(super) fn route_using(
        routes: &RouteTable,
        model: &str,
        versions: &[u64],
        none_left: impl Fn(Task) -> bool,
    ) -> Option<RouteUse> {
        routes.iter().find_map(|(name, entry)| {
            let task = entry.route.task;
            let targets = entry
                .route
                .arms
                .iter()
                .map(|arm| &arm.target)
                .chain(entry.route.shadow.iter().map(|shadow| &shadow.target));
            for target in targets {
                if let Ok((target_model, target_version)) = parse_target(target) {
                    let hit = target_model == model
                        && match target_version {
                            Some(version) => versions.contains(&version),
                            None => none_left(task),
                        };
                    if hit {
                        return Some(RouteUse {
                            route: name.clone(),
                            task,
                            by_bare_name: target_version.is_none(),
                        });
                    }
                }
            }
            None
        })
    }
}

/// A route that would lose what it serves from.
pub(super) struct RouteUse {
    pub route: String,
    pub task: Task,
    /// Whether the route names the model without a version.
    pub by_bare_name: bool,
}

/// Whether `model` is what one of `arms` names: that version, or the model by its bare name.
fn is_an_arm(model: &ModelVersion, arms: &[ArmConfig]) -> bool {
    arms.iter().any(|arm| match parse_target(&arm.target) {
        Ok((name, version)) => name == model.name && version.is_none_or(|v| v == model.version),
        Err(_) => false,
    })
}
