//! `--url` values: parsed once, resolved once, then reused for every connection, so a run does
//! no DNS lookups and no URL parsing while it measures.

use std::net::{SocketAddr, ToSocketAddrs};

use hyper::Uri;

/// One server to connect to.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given (for reports).
    pub url: String,
    /// `wss://`.
    pub tls: bool,
    /// Host name or address literal, without IPv6 brackets: the TLS server name.
    pub host: String,
    /// Value of the `Host` header: the URL's authority.
    pub authority: String,
    /// Request target of the upgrade: path and query, with `token=` appended when given.
    pub path_and_query: String,
    /// The resolved address connections go to.
    pub addr: SocketAddr,
}

/// A `--url` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("`{0}` is not a URL: {1}")]
    Parse(String, String),
    #[error("`{0}`: the scheme must be ws:// or wss://")]
    Scheme(String),
    #[error("`{0}` has no host")]
    NoHost(String),
    #[error("cannot resolve `{0}`: {1}")]
    Resolve(String, std::io::Error),
    #[error("`{0}` resolves to no {1} address (the family of --source-ips)")]
    NoAddress(String, &'static str),
}

impl Target {
    /// Parses and resolves `url`. With `want_ipv4` set, picks an address of that family (to match
    /// `--source-ips`).
    pub fn resolve(
        url: &str,
        token: Option<&str>,
        want_ipv4: Option<bool>,
    ) -> Result<Self, TargetError> {
        let uri: Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| {
            TargetError::Parse(url.to_owned(), e.to_string())
        })?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(TargetError::Scheme(url.to_owned())),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| TargetError::NoHost(url.to_owned()))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(TargetError::NoHost(url.to_owned()));
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let mut path_and_query = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
        if path_and_query.is_empty() {
            path_and_query.push('/');
        }
        if let Some(token) = token {
            let separator = if path_and_query.contains('?') {
                '&'
            } else {
                '?'
            };
            path_and_query.push(separator);
            path_and_query.push_str("token=");
            path_and_query.push_str(&percent_encode(token));
        }
        let addrs: Vec<SocketAddr> = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| TargetError::Resolve(url.to_owned(), e))?
            .collect();
        let addr = addrs
            .iter()
            .copied()
            .find(|a| want_ipv4.map_or(true, |v4| a.is_ipv4() == v4))
            .ok_or(TargetError::NoAddress(
                url.to_owned(),
                if want_ipv4 == Some(false) {
                    "IPv6"
                } else {
                    "IPv4"
                },
            ))?;
        Ok(Self {
            url: url.to_owned(),
            tls,
            host,
            authority: authority.as_str().to_owned(),
            path_and_query,
            addr,
        })
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so any token survives the
/// query string.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls_resolve_with_token_appended() {
        let t = Target::resolve("ws://127.0.0.1:9001/chat?x=1", Some("a b&c"), None).unwrap();
        assert!(!t.tls);
        assert_eq!(t.host, "127.0.0.1");
        assert_eq!(t.authority, "127.0.0.1:9001");
        assert_eq!(t.path_and_query, "/chat?x=1&token=a%20b%26c");
        assert_eq!(t.addr, "127.0.0.1:9001".parse().unwrap());

        let t = Target::resolve("wss://[::1]", Some("t"), None).unwrap();
        assert!(t.tls);
        assert_eq!(t.host, "::1");
        assert_eq!(t.path_and_query, "/?token=t");
        assert_eq!(t.addr.port(), 443);
    }

    #[test]
    fn bad_urls_are_refused() {
        assert!(matches!(
            Target::resolve("http://127.0.0.1/", None, None),
            Err(TargetError::Scheme(_))
        ));
        assert!(Target::resolve("not a url", None, None).is_err());
        assert!(matches!(
            Target::resolve("ws://127.0.0.1:1/", None, Some(false)),
            Err(TargetError::NoAddress(..))
        ));
    }
}
