//! Open connections counted by client address, so that one client cannot take every place
//! under a listener's `max_connections`: past `max_connections_per_client` its further
//! connections are closed as they are accepted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open connections by client address, on one listener.
#[derive(Default)]
pub struct ClientCounts(Mutex<HashMap<IpAddr, usize>>);

impl ClientCounts {
    /// A place for one more connection from `client`, or none where it holds `most` already
    /// (0: no limit). An IPv4 client that reaches a dual-stack listener counts as itself.
    pub fn admit(self: &Arc<Self>, client: IpAddr, most: usize) -> Option<ClientPlace> {
        let client = client.to_canonical();
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let open = counts.entry(client).or_insert(0);
        if most > 0 && *open >= most {
            return None;
        }
        *open += 1;
        Some(ClientPlace {
            counts: Arc::clone(self),
            client,
        })
    }
}

/// A connection's place among its client's, given back when the connection is dropped.
pub struct ClientPlace {
    counts: Arc<ClientCounts>,
    client: IpAddr,
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(open) = counts.get_mut(&self.client) {
            *open -= 1;
            if *open == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(counts: &Arc<ClientCounts>) -> usize {
        counts.0.lock().unwrap().values().sum()
    }

    #[test]
    fn a_client_at_its_limit_gets_a_place_again_once_one_is_given_back() {
        let counts = Arc::new(ClientCounts::default());
        let client: IpAddr = "10.0.0.1".parse().unwrap();
        let first = counts.admit(client, 2).unwrap();
        let _second = counts.admit(client, 2).unwrap();
        assert!(counts.admit(client, 2).is_none());
        // Another client is counted apart, and 0 is no limit.
        assert!(counts.admit("10.0.0.2".parse().unwrap(), 2).is_some());
        assert!(counts.admit(client, 0).is_some());
        drop(first);
        assert!(counts.admit(client, 2).is_some());
    }

    #[test]
    fn an_ipv4_client_on_a_dual_stack_listener_counts_as_itself() {
        let counts = Arc::new(ClientCounts::default());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let _place = counts.admit(mapped, 1).unwrap();
        assert!(counts.admit("10.0.0.1".parse().unwrap(), 1).is_none());
    }

    #[test]
    fn places_given_back_leave_no_entry_behind() {
        let counts = Arc::new(ClientCounts::default());
        let places: Vec<_> = (0..3)
            .map(|n| counts.admit(IpAddr::from([10, 0, 0, n]), 1).unwrap())
            .collect();
        assert_eq!(open(&counts), 3);
        drop(places);
        assert!(counts.0.lock().unwrap().is_empty());
    }
}
