//! The SSRF guard: webhook endpoints may not reach the notifier's own network.
//!
//! An endpoint is refused when its address is loopback, private (RFC 1918), shared (CGNAT),
//! link-local (which holds the cloud metadata address 169.254.169.254), unique-local,
//! site-local, multicast, broadcast, unspecified or reserved, including those addresses
//! written inside IPv6 (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo). Literal addresses
//! are checked before each request (the URL parser has already normalised decimal, octal and
//! hex forms); host names are checked at connect time on **every** address they resolve to, by
//! the HTTP client's resolver, so a name that resolves to a public address when the
//! subscription is made and to an internal one later (DNS rebinding) is still refused.
//! Redirects are not followed. With `--webhook-proxy` the client connects only to the proxy,
//! so the target's host name is checked with [`Guard::check_host`] before each attempt
//! instead (see the webhook module for what that does and does not guarantee).
//!
//! `--allow-targets` lists CIDRs and host names that are allowed anyway (internal receivers,
//! tests).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why an address is refused, when it is.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, _, _] = ip.octets();
    Some(match (a, b) {
        (0, _) => "unspecified (0.0.0.0/8)",
        (127, _) => "loopback",
        (10, _) | (172, 16..=31) | (192, 168) => "private",
        (100, 64..=127) => "shared address space (100.64.0.0/10, cloud metadata on some providers)",
        (169, 254) => "link-local (cloud metadata)",
        (192, 0) if ip.octets()[2] == 0 => "IETF protocol assignments",
        (198, 18..=19) => "benchmarking",
        (224..=239, _) => "multicast",
        (240..=255, _) => "reserved or broadcast",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4).or(Some("IPv4-mapped"));
    }
    let s = ip.segments();
    // IPv4-compatible (deprecated): ::a.b.c.d
    if s[..6] == [0; 6] {
        return Some("IPv4-compatible");
    }
    match s[0] {
        0xfe80..=0xfebf => return Some("link-local"),
        0xfec0..=0xfeff => return Some("site-local"),
        0xfc00..=0xfdff => return Some("unique-local (cloud metadata on some providers)"),
        0xff00..=0xffff => return Some("multicast"),
        _ => {}
    }
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from(((u32::from(hi)) << 16) | u32::from(lo));
    // NAT64 64:ff9b::/96 and 64:ff9b:1::/48 carry an IPv4 address in the last 32 bits.
    if s[0] == 0x64 && s[1] == 0xff9b {
        return forbidden_v4(embedded(s[6], s[7])).or(Some("NAT64"));
    }
    // 6to4 2002::/16 carries one in bits 16-48.
    if s[0] == 0x2002 {
        return forbidden_v4(embedded(s[1], s[2])).or(Some("6to4"));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Some("Teredo");
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return Some("documentation");
    }
    None
}

/// What may be reached despite the rules.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
}

/// A refusal by the guard (never retried).
#[derive(Debug, thiserror::Error)]
#[error("refused by the SSRF guard: {0}")]
pub struct Refused(pub String);

impl Guard {
    /// Parses `--allow-targets`: comma-separated CIDRs, addresses or host names.
    pub fn parse(list: Option<&str>) -> Result<Self, String> {
        let mut g = Guard::default();
        for item in list.unwrap_or_default().split(',').map(str::trim) {
            if item.is_empty() {
                continue;
            }
            if let Ok(net) = item.parse::<IpNet>() {
                g.nets.push(net);
            } else if let Ok(ip) = item.parse::<IpAddr>() {
                g.nets.push(IpNet::from(ip));
            } else if item
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                g.hosts
                    .push(item.trim_end_matches('.').to_ascii_lowercase());
            } else {
                return Err(format!(
                    "{item:?} is neither a CIDR (10.0.0.0/8), an address nor a host name"
                ));
            }
        }
        Ok(g)
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// Refuses `ip` unless allowed.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.nets.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        match forbidden(ip) {
            Some(why) => Err(Refused(format!(
                "{ip} is {why}; add it to --allow-targets if this receiver is meant to be internal"
            ))),
            None => Ok(()),
        }
    }

    /// Checks a URL before a request: its scheme, and its address when it is a literal.
    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused(format!("scheme {} is not http(s)", url.scheme())));
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
            None => Err(Refused("the URL has no host".into())),
        }
    }

    /// Checks a host name without connecting: allowed by name, or resolved and refused when
    /// any of its addresses is (used when deliveries go through a proxy).
    pub async fn check_host(&self, host: &str) -> Result<(), Refused> {
        if self.host_allowed(host) {
            return Ok(());
        }
        self.resolve(host).await.map(|_| ())
    }

    /// Resolves `host` and refuses it when any address it resolves to is refused.
    pub async fn resolve(&self, host: &str) -> Result<Vec<SocketAddr>, Refused> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| Refused(format!("{host} does not resolve: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(Refused(format!("{host} resolves to no address")));
        }
        if !self.host_allowed(host) {
            for a in &addrs {
                self.check_ip(a.ip())
                    .map_err(|Refused(why)| Refused(format!("{host} resolves to {why}")))?;
            }
        }
        Ok(addrs)
    }
}

/// The HTTP client's resolver: every connection's addresses pass the guard.
#[derive(Clone)]
pub struct GuardedResolver(pub Arc<Guard>);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = Arc::clone(&self.0);
        Box::pin(async move {
            let addrs = guard.resolve(name.as_str()).await?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Whether a request error came from the guard (walks the error's sources).
pub fn refusal_in(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r.to_string());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_internal_addresses_in_every_written_form() {
        let guard = Guard::default();
        let refused = [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://127.0.1.3:8080/",
            "http://0x7f.0.0.1/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://017700000001/",
            "http://0177.0.0.1/",
            "http://127.000.000.001/",
            "http://10.0.0.1/",
            "http://172.16.5.4/",
            "http://172.31.255.255/",
            "http://192.168.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://100.100.100.200/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://0/",
            "http://224.0.0.1/",
            "http://239.255.255.250/",
            "http://255.255.255.255/",
            "http://[::1]/",
            "http://[0:0:0:0:0:0:0:1]/",
            "http://[::]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[0:0:0:0:0:ffff:a00:1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::127.0.0.1]/",
            "http://[fe80::1]/",
            "http://[fec0::1]/",
            "http://[fc00::1]/",
            "http://[fd00:ec2::254]/",
            "http://[ff02::1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:c0a8:101::]/",
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
            "https://[::1]:8443/",
        ];
        for u in refused {
            let url = Url::parse(u).unwrap_or_else(|e| panic!("{u}: {e}"));
            assert!(guard.check_url(&url).is_err(), "{u} passed the guard");
        }
        assert!(refused.len() >= 30);
        for u in [
            "http://93.184.216.34/",
            "https://8.8.8.8/",
            "http://[2606:4700::1111]/",
            "https://hooks.example.com/x",
        ] {
            let url = Url::parse(u).unwrap_or_else(|e| panic!("{u}: {e}"));
            assert!(guard.check_url(&url).is_ok(), "{u} refused");
        }
        let ftp = Url::parse("ftp://example.com/").expect("url");
        assert!(guard.check_url(&ftp).is_err());
    }

    #[tokio::test]
    async fn host_names_are_checked_on_every_resolved_address() {
        let guard = Guard::default();
        for host in ["localhost", "localhost.", "LOCALHOST"] {
            let r = guard.resolve(host).await;
            assert!(r.is_err(), "{host} resolved past the guard: {r:?}");
        }
        let allowed = Guard::parse(Some("localhost")).expect("list");
        assert!(allowed.resolve("localhost").await.is_ok());
    }

    #[test]
    fn the_allow_list_admits_only_what_it_names() {
        let g =
            Guard::parse(Some("127.0.0.1/32, 10.1.0.0/16, ::1, receiver.internal")).expect("list");
        assert!(g.check_ip("127.0.0.1".parse().expect("ip")).is_ok());
        assert!(g.check_ip("127.0.0.2".parse().expect("ip")).is_err());
        assert!(g.check_ip("10.1.200.3".parse().expect("ip")).is_ok());
        assert!(g.check_ip("10.2.0.1".parse().expect("ip")).is_err());
        assert!(g.check_ip("::1".parse().expect("ip")).is_ok());
        assert!(g.host_allowed("Receiver.Internal."));
        assert!(Guard::parse(Some("not a host!")).is_err());
    }
}
