//! What a call brings to routing besides its model name, for every service alike: a sticky key
//! (the request's own field, else the configured header), a pinned arm (a header) and its
//! deadline, which admission by time uses.

use tonic::metadata::MetadataMap;

use super::deadline::Deadline;
use crate::config::{LimitsConfig, RoutingConfig};
use crate::error::Result;
use crate::tasks::limits::{check_name, check_target};
use crate::tasks::routing::Routing;

/// The routing of a call; `route_key` is the request's own key, when it sent one, which
/// `key_field` names in errors. A key is bounded like a name (`limits.max_name_bytes`): a route
/// hashes it once per arm, on the async workers.
pub fn routing(
    config: &RoutingConfig,
    limits: &LimitsConfig,
    metadata: &MetadataMap,
    deadline: Deadline,
    (key_field, route_key): (&str, Option<&str>),
) -> Result<Routing> {
    let header = |name: &str| {
        metadata
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let key = match route_key.filter(|key| !key.is_empty()) {
        Some(key) => {
            check_name(key_field, key, limits)?;
            Some(key.to_owned())
        }
        None => header(&config.key_header),
    };
    if let (Some(key), None) = (&key, route_key.filter(|key| !key.is_empty())) {
        check_name(&format!("the {} header", config.key_header), key, limits)?;
    }
    // An arm is named like a model, and a pin the route lacks is echoed in the refusal.
    let pin = header(&config.pin_header);
    if let Some(pin) = &pin {
        check_target(&format!("the {} header", config.pin_header), pin, limits)?;
    }
    let deadline = deadline.map(|(at, _)| at.into_std());
    Ok(Routing {
        key,
        pin,
        deadline,
        call_deadline: deadline,
    })
}
