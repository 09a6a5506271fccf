//! The route table: routes defined in config or through the API, checked against what is
//! loaded, and the per-request choice of arm and shadow.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use super::routes::RouteConfig;
use super::{ModelVersion, Registry, parse_target};
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
}

pub struct Routed {
    pub model: Arc<ModelVersion>,
    pub choice: Option<RouteChoice>,
    pub shadow: Option<Shadow>,
}

impl Registry {
    /// Resolves `target` — a route or a model — for `task`.
    pub fn route(&self, target: &str, task: Task, request: RouteRequest<'_>) -> Result<Routed> {
        let route = self
            .routes
            .read()
            .expect("routes lock")
            .get(target.trim())
            .cloned();
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
                    format!("`{pin}` is not an arm of route `{name}`; arms: {arms:?}"),
                )
            })?,
            None => route.pick(request.key, rand::random::<f64>()),
        };
        let arm_target = route.arms[arm].target.clone();
        let model = self.resolve(&arm_target, Some(task))?;
        let shadow = match &route.shadow {
            Some(shadow) if route.shadowed(request.key, rand::random::<f64>()) => {
                self.shadow_for(&name, &shadow.target, task)
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

    fn shadow_for(&self, route: &str, target: &str, task: Task) -> Option<Shadow> {
        let Ok(permit) = Arc::clone(&self.shadow_permits).try_acquire_owned() else {
            metrics::shadow_finished(route, target, "dropped");
            return None;
        };
        match self.resolve(target, Some(task)) {
            Ok(model) => Some(Shadow {
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

    /// Creates or replaces a route after checking it against what is loaded; it takes effect
    /// once it is saved.
    pub fn set_route(&self, name: &str, route: RouteConfig) -> Result<()> {
        self.check_route(name, &route)?;
        let mut routes = self.routes.write().expect("routes lock");
        let mut next = routes.clone();
        next.insert(name.to_owned(), route);
        self.commit(&next, |_| {})?;
        *routes = next;
        tracing::info!(route = name, "route set");
        Ok(())
    }

    pub fn delete_route(&self, name: &str) -> Result<()> {
        let mut routes = self.routes.write().expect("routes lock");
        let mut next = routes.clone();
        if next.remove(name).is_none() {
            return Err(Error::RouteNotFound {
                name: name.to_owned(),
            });
        }
        self.commit(&next, |_| {})?;
        *routes = next;
        tracing::info!(route = name, "route deleted");
        Ok(())
    }

    pub fn get_route(&self, name: &str) -> Result<RouteConfig> {
        self.routes
            .read()
            .expect("routes lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Error::RouteNotFound {
                name: name.to_owned(),
            })
    }

    pub fn list_routes(&self) -> BTreeMap<String, RouteConfig> {
        self.routes.read().expect("routes lock").clone()
    }

    /// Installs the routes of the state file (when the API ever changed them) or of the config.
    /// A route that no longer fits what loaded is left out with an error in the log.
    pub(super) fn install_startup_routes(&self) {
        let saved = self.persisted.lock().expect("state lock").routes.clone();
        let routes = saved.unwrap_or_else(|| self.config.routes.clone());
        for (name, route) in routes {
            match self.check_route(&name, &route) {
                Ok(()) => {
                    self.routes
                        .write()
                        .expect("routes lock")
                        .insert(name, route);
                }
                Err(error) => tracing::error!(route = %name, %error, "route left out"),
            }
        }
    }

    fn check_route(&self, name: &str, route: &RouteConfig) -> Result<()> {
        check_route_name(name)?;
        if self.model_slots(name).is_some() {
            return Err(Error::invalid(
                "route.name",
                format!("`{name}` is a model's name; a route needs a name of its own"),
            ));
        }
        route
            .check_shape()
            .map_err(|reason| Error::invalid("route", reason))?;
        let targets = route
            .arms
            .iter()
            .enumerate()
            .map(|(i, arm)| (format!("arms[{i}]"), &arm.target));
        let shadow = route
            .shadow
            .iter()
            .map(|shadow| ("shadow".to_owned(), &shadow.target));
        for (field, target) in targets.chain(shadow) {
            parse_target(target).map_err(|error| {
                Error::invalid(format!("route.{field}.target"), error.to_string())
            })?;
            if let Err(error) = self.resolve(target, Some(route.task)) {
                return Err(Error::FailedPrecondition(format!(
                    "route.{field}: `{target}` cannot serve {}: {error}",
                    route.task
                )));
            }
        }
        Ok(())
    }

    /// The first route that uses `model` at one of `versions` (or by bare name, when no version
    /// of the model would be left).
    pub(super) fn route_using(
        &self,
        model: &str,
        versions: &[u64],
        none_left: bool,
    ) -> Option<String> {
        let routes = self.routes.read().expect("routes lock");
        routes.iter().find_map(|(name, route)| {
            let targets = route
                .arms
                .iter()
                .map(|arm| &arm.target)
                .chain(route.shadow.iter().map(|shadow| &shadow.target));
            for target in targets {
                if let Ok((target_model, target_version)) = parse_target(target) {
                    let hit = target_model == model
                        && match target_version {
                            Some(version) => versions.contains(&version),
                            None => none_left,
                        };
                    if hit {
                        return Some(name.clone());
                    }
                }
            }
            None
        })
    }
}

/// A route name is what a request's `model` field can reach: letters, digits, '.', '_' and '-',
/// starting with a letter or digit (no spaces to trim away, no '@' or '/').
fn check_route_name(name: &str) -> Result<()> {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if first_ok && rest_ok {
        return Ok(());
    }
    Err(Error::invalid(
        "route.name",
        format!(
            "{} must start with a letter or digit and hold only letters, digits, '.', '_' and '-'",
            crate::error::echo(name)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_names_are_what_a_request_can_reach() {
        for good in ["chat", "chat-v2", "a.b_c", "9lives"] {
            assert!(check_route_name(good).is_ok(), "{good}");
        }
        for bad in ["", " padded ", "chat@1", "a/b", "-lead", "tab\t", "ünï"] {
            assert!(check_route_name(bad).is_err(), "{bad:?}");
        }
    }
}
