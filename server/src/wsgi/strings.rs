//! Python `str` objects reused from one request to the next.
//!
//! Consecutive requests on a worker mostly repeat each other's header names and many of their
//! values: the Host, the User-Agent and Accept of a proxy or client library, the path of a hot
//! endpoint, the proxy's address. A `str` is immutable, so giving the next request that carries
//! the same bytes the same object is invisible to the app, and saves building one per value per
//! request (a measurable share of a small request; see bench/README.md). Each thread keeps
//! its own cache: requests run under the GIL, and a thread-local needs no lock.

use std::cell::RefCell;

use pyo3::prelude::*;
use pyo3::types::PyString;

use super::environ::latin1;

/// Values longer than this are built afresh every time: no memory is kept for large cookies.
const MAX_VALUE: usize = 256;
/// Header names remembered; names beyond these (a client inventing new ones) are not cached.
const MAX_NAMES: usize = 128;
/// Slots for recently seen client ports (one per keep-alive connection of a busy proxy).
const PORT_SLOTS: usize = 1024;

/// The last `str` built for one environ entry, and the key it was built from.
#[derive(Default)]
pub struct Last {
    key: Vec<u8>,
    value: Option<Py<PyString>>,
}

impl Last {
    /// The `str` of `key`: the remembered one when the key is the same as last time, otherwise
    /// `build()`'s (remembered when the key is short).
    pub fn get_or<'py>(
        &mut self,
        py: Python<'py>,
        key: &[u8],
        build: impl FnOnce() -> Bound<'py, PyString>,
    ) -> Bound<'py, PyString> {
        if let Some(value) = &self.value
            && self.key == key
        {
            return value.bind(py).clone();
        }
        let value = build();
        if key.len() <= MAX_VALUE {
            self.key.clear();
            self.key.extend_from_slice(key);
            self.value = Some(value.clone().unbind());
        } else {
            self.value = None;
        }
        value
    }

    /// The latin-1 `str` of `bytes` (PEP 3333's native string).
    pub fn latin1<'py>(&mut self, py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyString> {
        self.get_or(py, bytes, || latin1(py, bytes))
    }
}

/// A header name as received, its CGI key (`HTTP_USER_AGENT`) and its last value.
struct Header {
    name: Box<str>,
    key: Py<PyString>,
    value: Last,
}

/// Every string a worker thread reuses.
#[derive(Default)]
pub struct Strings {
    /// In the order first seen. Clients send their headers in the same order request after
    /// request, so the entry after the last one found is tried first.
    headers: Vec<Header>,
    next_header: usize,
    pub query: Last,
    pub raw_uri: Last,
    pub path_info: Last,
    pub remote_addr: Last,
    /// SERVER_NAME and SERVER_PORT, by the Host header and scheme they came from.
    server: Option<(Vec<u8>, Py<PyString>, Py<PyString>)>,
    /// REMOTE_PORT by the port's low bits (one slot per keep-alive connection of a proxy).
    remote_ports: Vec<Option<(u16, Py<PyString>)>>,
}

impl Strings {
    /// The CGI key of header `name` and the `str` of its `value`, built by `key` and `latin1`
    /// only when not remembered.
    pub fn header<'py>(
        &mut self,
        py: Python<'py>,
        name: &str,
        value: &[u8],
        key: impl FnOnce() -> Bound<'py, PyString>,
    ) -> (Bound<'py, PyString>, Bound<'py, PyString>) {
        let hinted = self
            .headers
            .get(self.next_header)
            .is_some_and(|h| *h.name == *name);
        let found = if hinted {
            Some(self.next_header)
        } else {
            self.headers.iter().position(|h| *h.name == *name)
        };
        if let Some(i) = found {
            self.next_header = i + 1;
            let header = &mut self.headers[i];
            return (header.key.bind(py).clone(), header.value.latin1(py, value));
        }
        let key = key();
        if self.headers.len() >= MAX_NAMES {
            return (key, latin1(py, value));
        }
        let mut header = Header {
            name: name.into(),
            key: key.clone().unbind(),
            value: Last::default(),
        };
        let value = header.value.latin1(py, value);
        self.headers.push(header);
        self.next_header = self.headers.len();
        (key, value)
    }

    /// Starts a request: its first header is looked for at the start of the list.
    pub fn begin(&mut self) {
        self.next_header = 0;
    }

    /// SERVER_NAME and SERVER_PORT for a Host header (`split()` builds them when the host or
    /// the scheme, which decides the default port, changed).
    pub fn server<'py>(
        &mut self,
        py: Python<'py>,
        host: &[u8],
        https: bool,
        split: impl FnOnce() -> (Bound<'py, PyString>, Bound<'py, PyString>),
    ) -> (Bound<'py, PyString>, Bound<'py, PyString>) {
        if let Some((key, name, port)) = &self.server
            && key.first() == Some(&u8::from(https))
            && &key[1..] == host
        {
            return (name.bind(py).clone(), port.bind(py).clone());
        }
        let (name, port) = split();
        if host.len() <= MAX_VALUE {
            let mut key = Vec::with_capacity(host.len() + 1);
            key.push(u8::from(https));
            key.extend_from_slice(host);
            self.server = Some((key, name.clone().unbind(), port.clone().unbind()));
        }
        (name, port)
    }

    /// The `str` of a client port.
    pub fn remote_port<'py>(&mut self, py: Python<'py>, port: u16) -> Bound<'py, PyString> {
        if self.remote_ports.is_empty() {
            self.remote_ports.resize_with(PORT_SLOTS, || None);
        }
        let slot = &mut self.remote_ports[usize::from(port) % PORT_SLOTS];
        if let Some((p, value)) = slot
            && *p == port
        {
            return value.bind(py).clone();
        }
        let value = PyString::new(py, itoa::Buffer::new().format(port));
        *slot = Some((port, value.clone().unbind()));
        value
    }
}

thread_local! {
    static STRINGS: RefCell<Strings> = RefCell::new(Strings::default());
}

/// Runs `f` with this thread's strings.
pub fn with<R>(f: impl FnOnce(&mut Strings) -> R) -> R {
    STRINGS.with(|s| f(&mut s.borrow_mut()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_value_is_the_same_object_and_a_new_one_is_built() {
        Python::initialize();
        Python::attach(|py| {
            let mut last = Last::default();
            let a = last.latin1(py, b"/items");
            let b = last.latin1(py, b"/items");
            assert!(a.is(&b));
            let c = last.latin1(py, b"/other");
            assert_eq!(c.to_str().expect("str"), "/other");
            assert!(!a.is(&c));
            let long = vec![b'x'; MAX_VALUE + 1];
            let d = last.latin1(py, &long);
            let e = last.latin1(py, &long);
            assert_eq!(d.to_str().expect("str").len(), MAX_VALUE + 1);
            assert!(!d.is(&e), "long values are not kept");
        });
    }

    #[test]
    fn header_keys_and_ports_are_remembered() {
        Python::initialize();
        Python::attach(|py| {
            let mut strings = Strings::default();
            let mut built = 0;
            for _ in 0..3 {
                let (key, value) = strings.header(py, "User-Agent", b"curl/8", || {
                    built += 1;
                    PyString::new(py, "HTTP_USER_AGENT")
                });
                assert_eq!(key.to_str().expect("str"), "HTTP_USER_AGENT");
                assert_eq!(value.to_str().expect("str"), "curl/8");
            }
            assert_eq!(built, 1);
            let (_, other) = strings.header(py, "User-Agent", b"wrk", || unreachable!());
            assert_eq!(other.to_str().expect("str"), "wrk");
            let p = strings.remote_port(py, 51234);
            assert!(p.is(strings.remote_port(py, 51234)));
            let other = u16::try_from(51234 + PORT_SLOTS).expect("a port");
            assert_eq!(
                strings.remote_port(py, other).to_str().expect("str"),
                other.to_string()
            );
            assert_eq!(
                strings.remote_port(py, 51234).to_str().expect("str"),
                "51234"
            );
        });
    }
}
