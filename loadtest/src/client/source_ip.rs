//! `--source-ips`: the local addresses client sockets are bound to, handed out round-robin.
//!
//! Linux gives each (source IP, destination IP, destination port) about 28k ephemeral ports, so
//! one source address caps a generator near 28k connections per server port. Binding each socket
//! to the next of several loopback addresses (127.0.0.1-127.0.0.20 ...) lifts that cap; the
//! socket code sets `IP_BIND_ADDRESS_NO_PORT` so the bind does not reserve a port by itself.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Most addresses one `--source-ips` value may expand to.
const MAX_ADDRESSES: u128 = 1 << 16;

/// A parsed `--source-ips` list.
#[derive(Debug)]
pub struct SourceIps {
    addrs: Vec<IpAddr>,
    next: AtomicUsize,
}

impl Clone for SourceIps {
    fn clone(&self) -> Self {
        Self {
            addrs: self.addrs.clone(),
            next: AtomicUsize::new(0),
        }
    }
}

/// Why a `--source-ips` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SourceIpError {
    #[error("`{0}` is not an IP address")]
    BadAddress(String),
    #[error("range `{0}` mixes IPv4 and IPv6")]
    MixedFamilies(String),
    #[error("range `{0}` ends before it starts")]
    Reversed(String),
    #[error("range `{0}` holds more than {MAX_ADDRESSES} addresses")]
    TooLarge(String),
    #[error("no source address given")]
    Empty,
    #[error("the list mixes IPv4 and IPv6 addresses")]
    MixedList,
}

impl SourceIps {
    /// The addresses, in the order they are handed out.
    pub fn addrs(&self) -> &[IpAddr] {
        &self.addrs
    }

    /// The next address, round-robin; safe to call from any thread.
    pub fn next(&self) -> IpAddr {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.addrs[i % self.addrs.len()]
    }

    /// Whether the addresses are IPv4 (all of them are one family).
    pub fn is_ipv4(&self) -> bool {
        self.addrs[0].is_ipv4()
    }
}

impl FromStr for SourceIps {
    type Err = SourceIpError;

    /// Accepts a comma-separated list of items, each `ADDR`, `FIRST-LAST`, or `FIRST-N` where `N`
    /// replaces the last IPv4 octet (`127.0.0.1-20` is `127.0.0.1-127.0.0.20`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut addrs = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            expand(item, &mut addrs)?;
            if addrs.len() as u128 > MAX_ADDRESSES {
                return Err(SourceIpError::TooLarge(item.to_owned()));
            }
        }
        let Some(first) = addrs.first() else {
            return Err(SourceIpError::Empty);
        };
        if addrs.iter().any(|a| a.is_ipv4() != first.is_ipv4()) {
            return Err(SourceIpError::MixedList);
        }
        Ok(Self {
            addrs,
            next: AtomicUsize::new(0),
        })
    }
}

fn parse_ip(text: &str) -> Result<IpAddr, SourceIpError> {
    text.trim()
        .parse()
        .map_err(|_| SourceIpError::BadAddress(text.trim().to_owned()))
}

fn expand(item: &str, out: &mut Vec<IpAddr>) -> Result<(), SourceIpError> {
    // An IPv6 address has no '-', so the first '-' splits a range of either family.
    let Some((first, last)) = item.split_once('-') else {
        out.push(parse_ip(item)?);
        return Ok(());
    };
    let first = parse_ip(first)?;
    let last = match (first, last.trim().parse::<u8>()) {
        (IpAddr::V4(v4), Ok(octet)) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, octet])
        }
        _ => parse_ip(last)?,
    };
    let (start, end) = match (first, last) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b)),
        _ => return Err(SourceIpError::MixedFamilies(item.to_owned())),
    };
    if end < start {
        return Err(SourceIpError::Reversed(item.to_owned()));
    }
    if end - start >= MAX_ADDRESSES {
        return Err(SourceIpError::TooLarge(item.to_owned()));
    }
    for n in start..=end {
        out.push(match first {
            IpAddr::V4(_) => IpAddr::from((n as u32).to_be_bytes()),
            IpAddr::V6(_) => IpAddr::from(n.to_be_bytes()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> Vec<String> {
        let ips: SourceIps = text.parse().unwrap();
        ips.addrs().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn single_addresses_and_lists() {
        assert_eq!(list("127.0.0.1"), ["127.0.0.1"]);
        assert_eq!(list("127.0.0.1, 127.0.0.9"), ["127.0.0.1", "127.0.0.9"]);
        assert_eq!(list("::1"), ["::1"]);
    }

    #[test]
    fn ranges_expand_inclusively_across_octets() {
        let all = list("127.0.0.1-127.0.0.20");
        assert_eq!(all.len(), 20);
        assert_eq!(all[0], "127.0.0.1");
        assert_eq!(all[19], "127.0.0.20");
        assert_eq!(
            list("10.0.0.254-10.0.1.1"),
            ["10.0.0.254", "10.0.0.255", "10.0.1.0", "10.0.1.1"]
        );
        assert_eq!(list("127.0.0.5-7"), ["127.0.0.5", "127.0.0.6", "127.0.0.7"]);
        assert_eq!(list("::1-::3"), ["::1", "::2", "::3"]);
        assert_eq!(list("127.0.0.3-127.0.0.3"), ["127.0.0.3"]);
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let err = |t: &str| t.parse::<SourceIps>().unwrap_err();
        assert_eq!(err(""), SourceIpError::Empty);
        assert_eq!(err("nope"), SourceIpError::BadAddress("nope".into()));
        assert_eq!(
            err("127.0.0.9-127.0.0.1"),
            SourceIpError::Reversed("127.0.0.9-127.0.0.1".into())
        );
        assert_eq!(
            err("127.0.0.1-::1"),
            SourceIpError::MixedFamilies("127.0.0.1-::1".into())
        );
        assert_eq!(err("127.0.0.1,::1"), SourceIpError::MixedList);
        assert_eq!(
            err("10.0.0.0-10.2.0.0"),
            SourceIpError::TooLarge("10.0.0.0-10.2.0.0".into())
        );
    }

    #[test]
    fn addresses_are_handed_out_round_robin() {
        let ips: SourceIps = "127.0.0.1-3".parse().unwrap();
        let got: Vec<String> = (0..5).map(|_| ips.next().to_string()).collect();
        assert_eq!(
            got,
            [
                "127.0.0.1",
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.1",
                "127.0.0.2"
            ]
        );
    }
}
