//! Open connections counted by client, so that one client cannot take every place under a
//! listener's `max_connections`: past `max_connections_per_client` its further connections are
//! closed as they are accepted. A client is an IPv4 address, or the leading
//! `server.ipv6_client_prefix` bits of an IPv6 one.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// One client as the limit counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client {
    /// The address, with an IPv6 address's bits past `prefix` cleared.
    address: IpAddr,
    /// The bits that name the client: 32 for IPv4.
    prefix: u8,
}

impl Client {
    /// The client `address` belongs to. An IPv4 client that reaches a dual-stack listener (as
    /// `::ffff:a.b.c.d`) counts as itself; an IPv6 one by its first `ipv6_prefix` bits.
    pub fn of(address: IpAddr, ipv6_prefix: u8) -> Self {
        match address.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = ipv6_prefix.clamp(1, 128);
                let mask = u128::MAX << (128 - u32::from(prefix));
                Self {
                    address: IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask)),
                    prefix,
                }
            }
            v4 => Self {
                address: v4,
                prefix: 32,
            },
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V6(_) if self.prefix < 128 => write!(f, "{}/{}", self.address, self.prefix),
            address => write!(f, "{address}"),
        }
    }
}

/// Open connections by client, on one listener.
#[derive(Default)]
pub struct ClientCounts(Mutex<HashMap<Client, usize>>);

impl ClientCounts {
    /// A place for one more connection from `client`, or none where it holds `most` already
    /// (0: no limit).
    pub fn admit(self: &Arc<Self>, client: Client, most: usize) -> Option<ClientPlace> {
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
    client: Client,
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

    fn client(address: &str, ipv6_prefix: u8) -> Client {
        Client::of(address.parse().unwrap(), ipv6_prefix)
    }

    #[test]
    fn a_client_at_its_limit_gets_a_place_again_once_one_is_given_back() {
        let counts = Arc::new(ClientCounts::default());
        let first = counts.admit(client("10.0.0.1", 128), 2).unwrap();
        let _second = counts.admit(client("10.0.0.1", 128), 2).unwrap();
        assert!(counts.admit(client("10.0.0.1", 128), 2).is_none());
        // Another client is counted apart, and 0 is no limit.
        assert!(counts.admit(client("10.0.0.2", 128), 2).is_some());
        assert!(counts.admit(client("10.0.0.1", 128), 0).is_some());
        drop(first);
        assert!(counts.admit(client("10.0.0.1", 128), 2).is_some());
    }

    #[test]
    fn an_ipv4_client_on_a_dual_stack_listener_counts_as_itself() {
        let counts = Arc::new(ClientCounts::default());
        let _place = counts.admit(client("::ffff:10.0.0.1", 64), 1).unwrap();
        assert!(counts.admit(client("10.0.0.1", 64), 1).is_none());
        // The IPv6 prefix does not reach IPv4 addresses.
        assert!(counts.admit(client("10.0.0.2", 64), 1).is_some());
    }

    #[test]
    fn ipv6_addresses_count_as_one_client_by_their_leading_bits() {
        let counts = Arc::new(ClientCounts::default());
        let _place = counts.admit(client("2001:db8:1:2::1", 64), 1).unwrap();
        // Another address in the same /64 is the same client; one in the next /64 is not.
        assert!(
            counts
                .admit(client("2001:db8:1:2:ffff::9", 64), 1)
                .is_none()
        );
        assert!(counts.admit(client("2001:db8:1:3::1", 64), 1).is_some());
        // At 128 bits (the default) each address is a client.
        let _one = counts.admit(client("2001:db8:1:4::1", 128), 1).unwrap();
        assert!(counts.admit(client("2001:db8:1:4::2", 128), 1).is_some());
        assert_eq!(
            client("2001:db8:1:2:ffff::9", 64).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(client("2001:db8::7", 128).to_string(), "2001:db8::7");
        assert_eq!(client("::ffff:10.0.0.1", 64).to_string(), "10.0.0.1");
        assert_eq!(client("2001:db8::7", 1).to_string(), "::/1");
    }

    #[test]
    fn places_given_back_leave_no_entry_behind() {
        let counts = Arc::new(ClientCounts::default());
        let places: Vec<_> = (0..3)
            .map(|n| {
                let address = IpAddr::from([10, 0, 0, n]);
                counts.admit(Client::of(address, 128), 1).unwrap()
            })
            .collect();
        assert_eq!(open(&counts), 3);
        drop(places);
        assert!(counts.0.lock().unwrap().is_empty());
    }
}
