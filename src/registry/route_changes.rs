//! Changing the route table. Routes come from two places: the config file's `[routes]` (the same
//! on every replica, reloaded when the file changes) and the Models API (this replica alone,
//! saved in its state file). Each route keeps its source; the API cannot change a route the
//! config file defines, and a config route takes its name back from an API route.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::routes::RouteConfig;
use super::{Registry, parse_target};
use crate::config::Config;
use crate::error::{Error, Result, echo};

/// Where a route came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteSource {
    /// The config file's `[routes]`: on every replica alike.
    Config,
    /// `Models.SetRoute`: on the replica that took the call.
    Api,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteEntry {
    pub route: RouteConfig,
    pub source: RouteSource,
}

pub type RouteTable = BTreeMap<String, RouteEntry>;

/// Routes wanted but not (all) in the table yet: see `Registry::retry_routes`.
#[derive(Debug, Default)]
pub struct WaitingRoutes {
    /// The config file's `[routes]` as last read, admitted or not.
    pub config: BTreeMap<String, RouteConfig>,
    /// Routes the state file saved from the API that did not fit what loaded.
    pub api: BTreeMap<String, RouteConfig>,
}

/// The routes of `table` set through the API: what the state file keeps.
pub(super) fn api_routes(table: &RouteTable) -> BTreeMap<String, RouteConfig> {
    table
        .iter()
        .filter(|(_, entry)| entry.source == RouteSource::Api)
        .map(|(name, entry)| (name.clone(), entry.route.clone()))
        .collect()
}

impl Registry {
    /// Creates or replaces a route through the API, after checking it against what is loaded;
    /// it takes effect once it is saved.
    pub fn set_route(&self, name: &str, route: RouteConfig) -> Result<()> {
        // Checked under route_edits, which an unload holds from its own check of the routes until
        // its versions are gone: no route can come to name a version going away.
        let _edits = self.route_edits.lock().expect("route edits lock");
        self.check_route(name, &route)?;
        let mut next = self.list_routes();
        refuse_config_route(&next, name)?;
        next.insert(
            name.to_owned(),
            RouteEntry {
                route,
                source: RouteSource::Api,
            },
        );
        self.commit(&next, |_| {})?;
        // Only once saved: a failed write leaves a saved route that waited as it was.
        self.waiting_routes
            .lock()
            .expect("routes lock")
            .api
            .remove(name);
        *self.routes.write().expect("routes lock") = next;
        tracing::info!(route = name, "route set");
        Ok(())
    }

    pub fn delete_route(&self, name: &str) -> Result<()> {
        let _edits = self.route_edits.lock().expect("route edits lock");
        let mut next = self.list_routes();
        refuse_config_route(&next, name)?;
        // Out of the waiting routes for the save, which writes the ones still waiting.
        let waiting = self
            .waiting_routes
            .lock()
            .expect("routes lock")
            .api
            .remove(name);
        if next.remove(name).is_none() && waiting.is_none() {
            return Err(Error::RouteNotFound {
                name: name.to_owned(),
            });
        }
        if let Err(error) = self.commit(&next, |_| {}) {
            // Not deleted: the state file still has it, and it waits as before.
            if let Some(route) = waiting {
                self.waiting_routes
                    .lock()
                    .expect("routes lock")
                    .api
                    .insert(name.to_owned(), route);
            }
            return Err(error);
        }
        *self.routes.write().expect("routes lock") = next;
        tracing::info!(route = name, "route deleted");
        Ok(())
    }

    pub fn get_route(&self, name: &str) -> Result<RouteEntry> {
        self.routes
            .read()
            .expect("routes lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Error::RouteNotFound {
                name: name.to_owned(),
            })
    }

    pub fn list_routes(&self) -> RouteTable {
        self.routes.read().expect("routes lock").clone()
    }

    /// Installs the config file's routes and those the API saved in the state file. A route
    /// that does not fit what loaded is left out with an error in the log.
    pub(super) fn install_startup_routes(&self) {
        let _edits = self.route_edits.lock().expect("route edits lock");
        let saved = self
            .persisted
            .lock()
            .expect("state lock")
            .api_routes
            .clone();
        let mut table = RouteTable::new();
        let mut waiting = BTreeMap::new();
        for (name, route) in saved {
            if !self.admit_route(&mut table, name.clone(), route.clone(), RouteSource::Api) {
                waiting.insert(name, route);
            }
        }
        self.replace_config_routes(&mut table, self.config.routes.clone());
        waiting.retain(|name, _| !table.contains_key(name));
        self.waiting_routes.lock().expect("routes lock").api = waiting;
        *self.routes.write().expect("routes lock") = table;
    }

    /// After versions loaded: the config file's routes and the API's saved routes that were
    /// left out for a target not ready then are admitted where they now fit. Without this a
    /// replica whose load finished after a route was read would lack it until the next change
    /// of the file, while the replicas beside it had it.
    pub(super) fn retry_routes(&self) {
        let _edits = self.route_edits.lock().expect("route edits lock");
        self.apply_config_routes();
        let waiting = std::mem::take(&mut self.waiting_routes.lock().expect("routes lock").api);
        if waiting.is_empty() {
            return;
        }
        let mut next = self.list_routes();
        let mut still = BTreeMap::new();
        for (name, route) in waiting.clone() {
            // A config route took the name, or the API set it since: the saved one is gone.
            if next.contains_key(&name) {
                continue;
            }
            if self.check_route(&name, &route).is_ok() {
                tracing::info!(route = %name, "a saved route's targets are ready; route restored");
                next.insert(
                    name,
                    RouteEntry {
                        route,
                        source: RouteSource::Api,
                    },
                );
            } else {
                still.insert(name, route);
            }
        }
        self.waiting_routes.lock().expect("routes lock").api = still;
        match self.commit(&next, |_| {}) {
            Ok(()) => *self.routes.write().expect("routes lock") = next,
            Err(error) => {
                tracing::error!(%error, "saved routes not restored");
                self.waiting_routes.lock().expect("routes lock").api = waiting;
            }
        }
    }

    /// Puts the config file's `routes` in place of the config routes of `table`; they take the
    /// names of API routes they collide with. A route the file changed in a way that does not
    /// fit what is loaded (a target not ready yet, a typo) keeps serving as it was, so that a
    /// bad edit of a ConfigMap takes no route away from every replica; the new definition is
    /// tried again after each load.
    fn replace_config_routes(&self, table: &mut RouteTable, routes: BTreeMap<String, RouteConfig>) {
        let before = std::mem::take(table);
        table.extend(
            before
                .iter()
                .filter(|(name, entry)| {
                    entry.source == RouteSource::Api && !routes.contains_key(*name)
                })
                .map(|(name, entry)| (name.clone(), entry.clone())),
        );
        for (name, route) in routes {
            match (self.check_route(&name, &route), before.get(&name)) {
                (Ok(()), previous) => {
                    if previous.is_some_and(|entry| entry.source == RouteSource::Api) {
                        tracing::warn!(route = %name, "the config file defines this route; its API version is dropped");
                    }
                    let source = RouteSource::Config;
                    table.insert(name, RouteEntry { route, source });
                }
                (Err(error), Some(previous)) => {
                    if previous.route != route {
                        tracing::error!(route = %name, %error, "the config file's new definition of this route does not fit what is loaded; it serves as before, and the new one is tried again after each load");
                    }
                    table.insert(name, previous.clone());
                }
                (Err(error), None) => {
                    tracing::error!(route = %name, %error, "route left out; tried again after each load");
                }
            }
        }
    }

    /// Whether `route` fits what is loaded, and so went into `table`.
    fn admit_route(
        &self,
        table: &mut RouteTable,
        name: String,
        route: RouteConfig,
        source: RouteSource,
    ) -> bool {
        match self.check_route(&name, &route) {
            Ok(()) => {
                table.insert(name, RouteEntry { route, source });
                true
            }
            Err(error) => {
                tracing::error!(route = %name, %error, "route left out; tried again after each load");
                false
            }
        }
    }

    /// Reads the config file's `[routes]` again whenever the file changes, and applies them:
    /// Kubernetes updates a mounted ConfigMap in place, so every replica converges on the same
    /// routes without a restart. A file that does not parse leaves the routes as they are.
    pub async fn watch_routes(self: Arc<Self>, file: PathBuf) {
        let interval = self.config.routing.reload_interval_ms;
        if interval == 0 {
            return;
        }
        // Nothing seen yet: the first look applies the file as it is now, which a change made
        // while the models loaded (after the routes were read at startup) may have changed.
        let mut seen = None;
        let mut ticker = tokio::time::interval(Duration::from_millis(interval));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = std::fs::read(&file).ok();
            if now.is_none() || now == seen {
                continue;
            }
            seen = now;
            match Config::routes_in(&file) {
                Ok(routes) => {
                    self.waiting_routes.lock().expect("routes lock").config = routes;
                    self.reload_config_routes();
                }
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "the config file changed but does not parse; routes unchanged")
                }
            }
        }
    }

    fn reload_config_routes(&self) {
        let _edits = self.route_edits.lock().expect("route edits lock");
        self.apply_config_routes();
    }

    /// Applies the config file's routes as last read; the caller holds `route_edits`. They are
    /// read under it, so that a retry after a load and a change of the file, racing, both end
    /// on the newest file.
    fn apply_config_routes(&self) {
        let routes = self
            .waiting_routes
            .lock()
            .expect("routes lock")
            .config
            .clone();
        let before = self.list_routes();
        let mut next = before.clone();
        self.replace_config_routes(&mut next, routes);
        if next == before {
            return;
        }
        // API routes the config took over are no longer saved.
        if api_routes(&next) != api_routes(&before)
            && let Err(error) = self.commit(&next, |_| {})
        {
            tracing::error!(%error, "routes from the config file not applied");
            return;
        }
        tracing::info!(routes = next.len(), "routes reloaded from the config file");
        *self.routes.write().expect("routes lock") = next;
    }

    pub(super) fn check_route(&self, name: &str, route: &RouteConfig) -> Result<()> {
        check_route_name(name)?;
        if self.model_slots(name).is_some() {
            return Err(Error::invalid(
                "route.name",
                format!(
                    "{} is a model's name; a route needs a name of its own",
                    echo(name)
                ),
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
                    "route.{field}: {} cannot serve {}: {error}",
                    echo(target),
                    route.task
                )));
            }
        }
        Ok(())
    }
}

/// The API may not change a route the config file defines: the file would put it back.
fn refuse_config_route(table: &RouteTable, name: &str) -> Result<()> {
    match table.get(name) {
        Some(entry) if entry.source == RouteSource::Config => {
            Err(Error::FailedPrecondition(format!(
                "route {} comes from the config file, on every replica alike; change it there (replicas reload it)",
                echo(name)
            )))
        }
        _ => Ok(()),
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
            echo(name)
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
