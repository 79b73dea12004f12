//! Socket addresses on the command line: `--target` (copy, migrate) and `--listen` (serve)
//! take `ip:port`, `[ipv6]:port` or `host:port`.
//!
//! What it does: parses an address as written, else resolves the host name with the system
//! resolver ([`std::net::ToSocketAddrs`]) and takes its first IPv4 address, else its first
//! address. IPv4 first because the daemon's default `listen` is `0.0.0.0:7070`: a `localhost`
//! that resolves to `::1` first would miss it.
//!
//! What it does not: keep the name. The address is resolved once, when the flags are parsed;
//! a daemon that moves to another address needs the command run again.
//!
//! Invariants: an error names what was given and says what to give instead.

use std::net::{SocketAddr, ToSocketAddrs};

/// The clap value parser of an address flag (see the module docs).
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    resolve_with(text, |host_port| host_port.to_socket_addrs().map(Iterator::collect))
}

/// [`parse_socket_addr`] with the resolver given (the tests resolve without a network).
fn resolve_with(
    text: &str,
    resolve: impl FnOnce(&str) -> std::io::Result<Vec<SocketAddr>>,
) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} has no port: give HOST:PORT, e.g. 10.0.0.2:7070 or node-b.example:7070"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{text:?} is not an address: give HOST:PORT, e.g. 10.0.0.2:7070 or node-b.example:7070"));
    }
    let found = resolve(text)
        .map_err(|e| format!("cannot resolve the host name {host:?} ({e}): check the name, or give an ip:port"))?;
    found
        .iter()
        .find(|addr| addr.is_ipv4())
        .or_else(|| found.first())
        .copied()
        .ok_or_else(|| format!("the host name {host:?} resolves to no address: check the name, or give an ip:port"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn no_resolver(_: &str) -> std::io::Result<Vec<SocketAddr>> {
        Err(std::io::Error::other("no resolver in this test"))
    }

    #[test]
    fn addresses_as_written_need_no_resolver() {
        assert_eq!(resolve_with("10.0.0.2:7070", no_resolver), Ok("10.0.0.2:7070".parse().unwrap()));
        assert_eq!(resolve_with(" [::1]:7070 ", no_resolver), Ok("[::1]:7070".parse().unwrap()));
    }

    #[test]
    fn host_names_resolve_ipv4_first() {
        let v6: SocketAddr = "[::1]:7070".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        assert_eq!(resolve_with("localhost:7070", |_| Ok(vec![v6, v4])), Ok(v4));
        assert_eq!(resolve_with("localhost:7070", |_| Ok(vec![v6])), Ok(v6));
        // The system resolver knows localhost (the `ferry copy --target localhost:PORT` case).
        assert!(parse_socket_addr("localhost:7070").unwrap().ip().is_loopback());
    }

    #[test]
    fn names_that_do_not_resolve_and_malformed_addresses_are_named() {
        let err = resolve_with("node-b.invalid:7070", no_resolver).unwrap_err();
        assert!(err.contains("cannot resolve the host name \"node-b.invalid\""), "{err}");
        let err = resolve_with("node-b.invalid:7070", |_| Ok(Vec::new())).unwrap_err();
        assert!(err.contains("\"node-b.invalid\" resolves to no address"), "{err}");
        for bad in ["node-b", "10.0.0.2", ":7070", "node-b:port", "node-b:70000"] {
            let err = resolve_with(bad, no_resolver).unwrap_err();
            assert!(err.contains("HOST:PORT"), "{bad}: {err}");
        }
    }
}
