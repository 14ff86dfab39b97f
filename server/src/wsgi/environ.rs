//! The WSGI environ: a base dict built once per worker, copied and completed per request with
//! the values gunicorn gives for the same request.

use std::net::{IpAddr, SocketAddr};

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use super::strings::Strings;

use crate::http::{RequestHead, Version};

/// What the server knows about the two ends of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address; `None` on a Unix socket.
    pub remote: Option<SocketAddr>,
    /// The listening address the connection came in on; `None` on a Unix socket.
    pub local: Option<SocketAddr>,
    /// Whether the client may set the scheme through forwarding headers (`--forwarded-allow-ips`).
    pub trusted_proxy: bool,
}

/// One entry of `--forwarded-allow-ips`.
enum Entry {
    Any,
    Net(IpAddr, u8),
    Empty,
}

/// `--forwarded-allow-ips`: addresses and networks whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    any: bool,
    nets: Vec<(IpAddr, u8)>,
}

impl TrustedProxies {
    /// Parses gunicorn's list: `*`, addresses, or CIDR networks; empty entries are skipped.
    ///
    /// # Errors
    /// An entry that is neither `*`, an IP address nor a network.
    pub fn parse(entries: &[String]) -> anyhow::Result<Self> {
        let mut out = Self::default();
        for entry in entries.iter().flat_map(|e| e.split(',')) {
            match Self::entry(entry).map_err(|e| anyhow::anyhow!("--forwarded-allow-ips: {e}"))? {
                Entry::Any => out.any = true,
                Entry::Net(ip, bits) => out.nets.push((ip, bits)),
                Entry::Empty => {}
            }
        }
        Ok(out)
    }

    /// Checks one entry of the list (settings validate each with it); returns it trimmed.
    ///
    /// # Errors
    /// What is wrong with the entry.
    pub fn check_entry(entry: &str) -> Result<String, String> {
        Self::entry(entry).map(|_| entry.trim().to_owned())
    }

    fn entry(entry: &str) -> Result<Entry, String> {
        let entry = entry.trim();
        if entry.is_empty() {
            return Ok(Entry::Empty);
        }
        if entry == "*" {
            return Ok(Entry::Any);
        }
        let (addr, bits) = match entry.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (entry, None),
        };
        let not = || format!("{entry} is not `*`, an IP address or a network (such as 10.0.0.0/8)");
        let ip: IpAddr = addr.parse().map_err(|_| not())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(not)?,
            None => max,
        };
        Ok(Entry::Net(ip, bits))
    }

    /// True when forwarding headers from `peer` are believed. Unix-socket peers are trusted, as
    /// in gunicorn (the proxy is on the same host).
    pub fn allows(&self, peer: Option<IpAddr>) -> bool {
        let Some(ip) = peer else { return true };
        if self.any {
            return true;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.nets
            .iter()
            .any(|(net, bits)| same_prefix(ip, *net, *bits))
    }
}

fn same_prefix(a: IpAddr, b: IpAddr, bits: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Builds the per-worker constant part of the environ.
///
/// # Errors
/// Only if basic Python objects cannot be created.
pub fn base_environ<'py>(
    py: Python<'py>,
    multiprocess: bool,
    multithread: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let env = PyDict::new(py);
    env.set_item("wsgi.version", PyTuple::new(py, [1, 0])?)?;
    env.set_item("wsgi.multithread", multithread)?;
    env.set_item("wsgi.multiprocess", multiprocess)?;
    env.set_item("wsgi.run_once", false)?;
    env.set_item("wsgi.input_terminated", true)?;
    env.set_item("wsgi.errors", py.import("sys")?.getattr("stderr")?)?;
    env.set_item(
        "wsgi.file_wrapper",
        py.get_type::<super::file_wrapper::FileWrapper>(),
    )?;
    env.set_item(
        "SERVER_SOFTWARE",
        concat!("forkscope/", env!("CARGO_PKG_VERSION")),
    )?;
    Ok(env)
}

/// Keys every request sets ([`fill`] and the WSGI bridge): placeholders in the template.
const PER_REQUEST_KEYS: [&str; 7] = [
    "RAW_URI",
    "REMOTE_ADDR",
    "SERVER_NAME",
    "SERVER_PORT",
    "PATH_INFO",
    "wsgi.input",
    "wsgi.early_hints",
];

/// What the dict given to [`fill`] already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A copy of [`request_template`]: the usual values are there, only others are set.
    Template,
    /// A base environ: every per-request key is set.
    Base,
}

/// The dict each request's environ is copied from: the base environ, the values most requests
/// share (`GET`, no query, HTTP/1.1, `http`, this worker's SCRIPT_NAME; [`fill`] sets them only
/// when a request differs), a placeholder for every other key each request sets, and room for
/// about 20 more (its headers) before the copy must grow.
///
/// A copy keeps the table size of its source, and a request adds its keys and headers to it:
/// from the base alone, each copy grew its table once per request. CPython has no public way
/// to size a dict, so two keys past the current capacity (21 of a 32-slot table) are inserted,
/// which doubles the table, and deleted again; the table stays dense enough that `dict.copy()`
/// still clones it whole instead of inserting key by key.
///
/// # Errors
/// Only if basic Python objects cannot be created.
pub fn request_template<'py>(
    py: Python<'py>,
    multiprocess: bool,
    multithread: bool,
    script_name: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let env = base_environ(py, multiprocess, multithread)?;
    env.set_item(intern!(py, "REQUEST_METHOD"), intern!(py, "GET"))?;
    env.set_item(intern!(py, "QUERY_STRING"), intern!(py, ""))?;
    env.set_item(intern!(py, "SERVER_PROTOCOL"), intern!(py, "HTTP/1.1"))?;
    env.set_item(intern!(py, "wsgi.url_scheme"), intern!(py, "http"))?;
    env.set_item(intern!(py, "SCRIPT_NAME"), script_name)?;
    for key in PER_REQUEST_KEYS {
        env.set_item(key, py.None())?;
    }
    let grow = ["forkscope.grow.0", "forkscope.grow.1"];
    for key in grow {
        env.set_item(key, py.None())?;
    }
    for key in grow {
        env.del_item(key)?;
    }
    Ok(env)
}

/// Decodes bytes as latin-1 into a Python str (PEP 3333's "native string").
pub fn latin1<'py>(py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyString> {
    if bytes.is_ascii() {
        return PyString::new(py, std::str::from_utf8(bytes).expect("ASCII is UTF-8"));
    }
    let s: String = bytes.iter().map(|&b| b as char).collect();
    PyString::new(py, &s)
}

/// Percent-decodes a path to bytes (invalid escapes stay as they are), as gunicorn's
/// `unquote_to_wsgi_str` does before decoding latin-1.
pub fn percent_decode(raw: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !raw.contains(&b'%') {
        return std::borrow::Cow::Borrowed(raw);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%'
            && i + 2 < raw.len()
            && let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(raw[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

/// The `HTTP_*` key of a header name (`x-forwarded-for` → `HTTP_X_FORWARDED_FOR`).
fn cgi_key(name: &str) -> String {
    let mut key = String::with_capacity(5 + name.len());
    key.push_str("HTTP_");
    key.extend(name.chars().map(|c| {
        if c == '-' {
            '_'
        } else {
            c.to_ascii_uppercase()
        }
    }));
    key
}

/// Fills the per-request part of `env` (a copy of the base environ).
///
/// The strings come from this thread's [`strings`](super::strings) cache: a value the previous
/// request on this thread also carried is the same `str` object again.
///
/// # Errors
/// Only if Python objects cannot be created.
pub fn fill<'py>(
    py: Python<'py>,
    env: &Bound<'py, PyDict>,
    start: Start,
    head: &RequestHead,
    peer: &Peer,
    script_name: &str,
) -> PyResult<()> {
    super::strings::with(|strings: &mut Strings| {
        strings.begin();
        let all = start == Start::Base;
        if all || head.method != "GET" {
            env.set_item(intern!(py, "REQUEST_METHOD"), method_str(py, &head.method))?;
        }
        if all || !head.query.is_empty() {
            env.set_item(
                intern!(py, "QUERY_STRING"),
                strings.query.latin1(py, &head.query),
            )?;
        }
        env.set_item(
            intern!(py, "RAW_URI"),
            strings.raw_uri.latin1(py, &head.target),
        )?;
        if all || head.version != Version::Http11 {
            env.set_item(
                intern!(py, "SERVER_PROTOCOL"),
                match head.version {
                    Version::Http10 => intern!(py, "HTTP/1.0"),
                    Version::Http11 => intern!(py, "HTTP/1.1"),
                },
            )?;
        }

        let mut host: Option<&[u8]> = None;
        let mut scheme_https = false;
        for (name, value) in &head.headers {
            // Underscores make `X_Forwarded` and `X-Forwarded` collide in CGI names: a spoofing
            // vector, so such headers are dropped (gunicorn's default `header_map = "drop"`).
            if name.contains('_') {
                continue;
            }
            if name.eq_ignore_ascii_case("content-type") {
                env.set_item(intern!(py, "CONTENT_TYPE"), latin1(py, value))?;
                continue;
            }
            if name.eq_ignore_ascii_case("content-length") {
                env.set_item(intern!(py, "CONTENT_LENGTH"), latin1(py, value))?;
                continue;
            }
            if name.eq_ignore_ascii_case("host") {
                host = Some(value);
            } else if peer.trusted_proxy && is_secure_scheme_header(name, value) {
                scheme_https = true;
            }
            let (key, value) =
                strings.header(py, name, value, || PyString::new(py, &cgi_key(name)));
            set_or_join(env, &key, value)?;
        }

        if all || scheme_https {
            let scheme = if scheme_https {
                intern!(py, "https")
            } else {
                intern!(py, "http")
            };
            env.set_item(intern!(py, "wsgi.url_scheme"), scheme)?;
        }

        match peer.remote {
            Some(addr) => {
                let ip = addr.ip();
                // The address's bytes are the key: 4 for IPv4, 16 for IPv6, so they cannot collide.
                let mut octets = [0u8; 16];
                let key: &[u8] = match ip {
                    IpAddr::V4(v4) => {
                        octets[..4].copy_from_slice(&v4.octets());
                        &octets[..4]
                    }
                    IpAddr::V6(v6) => {
                        octets.copy_from_slice(&v6.octets());
                        &octets
                    }
                };
                let remote = strings
                    .remote_addr
                    .get_or(py, key, || PyString::new(py, &ip.to_string()));
                env.set_item(intern!(py, "REMOTE_ADDR"), remote)?;
                env.set_item(
                    intern!(py, "REMOTE_PORT"),
                    strings.remote_port(py, addr.port()),
                )?;
            }
            None => env.set_item(intern!(py, "REMOTE_ADDR"), intern!(py, ""))?,
        }

        let (server_name, server_port) = match host {
            Some(h) => strings.server(py, h, scheme_https, || {
                let (name, port) = split_host(h, if scheme_https { "https" } else { "http" });
                (PyString::new(py, &name), PyString::new(py, &port))
            }),
            None => match peer.local {
                Some(a) => (
                    PyString::new(py, &a.ip().to_string()),
                    PyString::new(py, &a.port().to_string()),
                ),
                None => (intern!(py, "").clone(), intern!(py, "").clone()),
            },
        };
        env.set_item(intern!(py, "SERVER_NAME"), server_name)?;
        env.set_item(intern!(py, "SERVER_PORT"), server_port)?;

        let path = percent_decode(&head.path);
        let path_info: &[u8] = if !script_name.is_empty() {
            path.strip_prefix(script_name.as_bytes()).unwrap_or(&path)
        } else {
            &path
        };
        if all {
            env.set_item(intern!(py, "SCRIPT_NAME"), script_name)?;
        }
        env.set_item(
            intern!(py, "PATH_INFO"),
            strings.path_info.latin1(py, path_info),
        )?;
        Ok(())
    })
}

/// Repeated headers are joined with a comma, as gunicorn does.
fn set_or_join<'py>(
    env: &Bound<'py, PyDict>,
    key: &Bound<'py, PyString>,
    value: Bound<'py, PyString>,
) -> PyResult<()> {
    match env.get_item(key)? {
        Some(old) => {
            let joined = format!("{},{}", old.extract::<String>()?, value.to_str()?);
            env.set_item(key, joined)
        }
        None => env.set_item(key, value),
    }
}

/// gunicorn's default `secure_scheme_headers`.
fn is_secure_scheme_header(name: &str, value: &[u8]) -> bool {
    (name.eq_ignore_ascii_case("x-forwarded-proto") && value.eq_ignore_ascii_case(b"https"))
        || (name.eq_ignore_ascii_case("x-forwarded-protocol") && value.eq_ignore_ascii_case(b"ssl"))
        || (name.eq_ignore_ascii_case("x-forwarded-ssl") && value.eq_ignore_ascii_case(b"on"))
}

/// Splits a Host header into SERVER_NAME and SERVER_PORT (the scheme's port when absent).
fn split_host(host: &[u8], scheme: &str) -> (String, String) {
    let host: String = host.iter().map(|&b| b as char).collect();
    let default_port = if scheme == "https" { "443" } else { "80" };
    if let Some(rest) = host.strip_prefix('[')
        && let Some((name, after)) = rest.split_once(']')
    {
        let port = after.strip_prefix(':').unwrap_or(default_port);
        return (format!("[{name}]"), port.to_owned());
    }
    match host.rsplit_once(':') {
        Some((name, port)) => (name.to_owned(), port.to_owned()),
        None => (host, default_port.to_owned()),
    }
}

/// Common methods are interned; others are built per request.
fn method_str<'py>(py: Python<'py>, method: &str) -> Bound<'py, PyString> {
    match method {
        "GET" => intern!(py, "GET").clone(),
        "POST" => intern!(py, "POST").clone(),
        "HEAD" => intern!(py, "HEAD").clone(),
        "PUT" => intern!(py, "PUT").clone(),
        "DELETE" => intern!(py, "DELETE").clone(),
        other => PyString::new(py, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(&*percent_decode(b"/a%20b"), b"/a b");
        assert_eq!(&*percent_decode(b"/%zz%4"), b"/%zz%4");
        assert_eq!(&*percent_decode(b"/caf%C3%A9"), b"/caf\xc3\xa9");
    }

    #[test]
    fn host_splitting() {
        assert_eq!(
            split_host(b"example.com", "http"),
            ("example.com".into(), "80".into())
        );
        assert_eq!(
            split_host(b"example.com", "https"),
            ("example.com".into(), "443".into())
        );
        assert_eq!(split_host(b"h:8080", "http"), ("h".into(), "8080".into()));
        assert_eq!(split_host(b"[::1]:9", "http"), ("[::1]".into(), "9".into()));
    }

    #[test]
    fn trusted_proxies() {
        let t = TrustedProxies::parse(&["127.0.0.1,10.0.0.0/8".into(), "::1".into()]).expect("ok");
        assert!(t.allows(Some("127.0.0.1".parse().expect("ip"))));
        assert!(t.allows(Some("10.2.3.4".parse().expect("ip"))));
        assert!(t.allows(Some("::ffff:127.0.0.1".parse().expect("ip"))));
        assert!(!t.allows(Some("192.168.1.1".parse().expect("ip"))));
        assert!(t.allows(None));
        assert!(
            TrustedProxies::parse(&["*".into()])
                .expect("ok")
                .allows(Some("8.8.8.8".parse().expect("ip")))
        );
        assert!(TrustedProxies::parse(&["nope".into()]).is_err());
    }
}
