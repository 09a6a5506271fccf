//! What a call brings to routing besides its model name, for every service alike: a sticky key
//! (the request's own field, else the configured header), a pinned arm (a header) and its
//! deadline, which admission by time uses.

use tonic::metadata::MetadataMap;

use super::deadline::Deadline;
use crate::config::RoutingConfig;
use crate::tasks::routing::Routing;

/// The routing of a call; `route_key` is the request's own key, when it sent one.
pub fn routing(
    config: &RoutingConfig,
    metadata: &MetadataMap,
    deadline: Deadline,
    route_key: Option<&str>,
) -> Routing {
    let header = |name: &str| {
        metadata
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let key = match route_key.filter(|key| !key.is_empty()) {
        Some(key) => Some(key.to_owned()),
        None => header(&config.key_header),
    };
    Routing {
        key,
        pin: header(&config.pin_header),
        deadline: deadline.map(|(at, _)| at.into_std()),
    }
}
