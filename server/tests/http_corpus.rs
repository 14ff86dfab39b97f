//! The data-driven HTTP parser corpus: every `requests/valid/NNN.http` must parse into what its
//! `NNN.json` says, every `requests/invalid/NNN.http` must be refused with the status its
//! `NNN.json` names. Each case is fed whole, line by line, byte by byte, split in two at every
//! offset, and in seeded random chunks, the way a socket may deliver it. The file format is
//! described in `requests/README.md`; adding a case needs no Rust code.

use std::fs;
use std::path::{Path, PathBuf};

use forkscope_server::http::{BodyDecoder, HttpError, Limits, RequestHead, Version, parse_head};
use serde_json::Value;

/// Decodes the escapes of a `.http` file (real line breaks are ignored).
fn decode_http_file(path: &Path) -> Vec<u8> {
    let raw = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text: Vec<u8> = raw
        .into_iter()
        .filter(|b| *b != b'\n' && *b != b'\r')
        .collect();
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'\\' {
            out.push(text[i]);
            i += 1;
            continue;
        }
        let escape = *text
            .get(i + 1)
            .unwrap_or_else(|| panic!("{}: dangling backslash", path.display()));
        i += 2;
        out.push(match escape {
            b'r' => b'\r',
            b'n' => b'\n',
            b't' => b'\t',
            b'0' => 0,
            b'\\' => b'\\',
            b'x' => {
                let hex = std::str::from_utf8(&text[i..i + 2]).expect("ASCII hex digits");
                i += 2;
                u8::from_str_radix(hex, 16)
                    .unwrap_or_else(|e| panic!("{}: bad \\x escape: {e}", path.display()))
            }
            other => panic!("{}: unknown escape \\{}", path.display(), other as char),
        });
    }
    out
}

/// A JSON string whose characters are bytes (U+0000..U+00FF), the latin-1 view WSGI uses.
fn latin1(value: &Value, what: &str) -> Vec<u8> {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} must be a string"))
        .chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap_or_else(|_| panic!("{what}: {c:?} > U+00FF")))
        .collect()
}

fn limits_of(spec: &Value) -> Limits {
    let mut limits = Limits::default();
    if let Some(l) = spec.get("limits") {
        let get = |k: &str, d: usize| l.get(k).and_then(Value::as_u64).map_or(d, |v| v as usize);
        limits.request_line = get("request_line", limits.request_line);
        limits.fields = get("fields", limits.fields);
        limits.field_size = get("field_size", limits.field_size);
    }
    limits
}

/// One request as the worker would see it: head plus decoded body.
#[derive(Debug)]
struct Parsed {
    head: RequestHead,
    body: Vec<u8>,
}

/// What feeding a whole input produced.
#[derive(Debug)]
struct Outcome {
    requests: Vec<Parsed>,
    error: Option<HttpError>,
    /// Bytes left over (an incomplete request) when the input ended without an error.
    leftover: usize,
}

/// Feeds `input` in the pieces `cuts` delimits, like a worker reading a socket: parse the head
/// when possible, then decode the body, then the next pipelined request.
fn feed(input: &[u8], cuts: &[usize], limits: &Limits) -> Outcome {
    let mut buf: Vec<u8> = Vec::new();
    let mut requests = Vec::new();
    let mut body: Option<(RequestHead, BodyDecoder, Vec<u8>)> = None;
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&input.len())) {
        if to <= from {
            continue;
        }
        buf.extend_from_slice(&input[from..to]);
        from = to;
        loop {
            if let Some((_, decoder, out)) = body.as_mut() {
                match decoder.decode(&buf, out) {
                    Err(error) => {
                        return Outcome {
                            requests,
                            error: Some(error),
                            leftover: 0,
                        };
                    }
                    Ok((consumed, done)) => {
                        buf.drain(..consumed);
                        if !done {
                            assert!(buf.is_empty(), "decoder left input it could use");
                            break;
                        }
                        let (head, _, out) = body.take().expect("in body state");
                        requests.push(Parsed { head, body: out });
                    }
                }
            }
            match parse_head(&buf, limits) {
                Err(error) => {
                    return Outcome {
                        requests,
                        error: Some(error),
                        leftover: 0,
                    };
                }
                Ok(None) => break,
                Ok(Some((head, consumed))) => {
                    assert!(consumed > 0 && consumed <= buf.len());
                    buf.drain(..consumed);
                    let decoder = BodyDecoder::new(head.framing);
                    body = Some((head, decoder, Vec::new()));
                }
            }
        }
    }
    let leftover = buf.len() + usize::from(body.is_some());
    Outcome {
        requests,
        error: None,
        leftover,
    }
}

/// Tiny deterministic PRNG (xorshift64*), so chunkings are reproducible without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Every chunking a case is fed with, named for failure messages.
fn chunkings(input: &[u8]) -> Vec<(String, Vec<usize>)> {
    let mut all = vec![("whole".to_owned(), Vec::new())];
    let lines: Vec<usize> = memchr_positions(input).map(|i| i + 1).collect();
    all.push(("line by line".to_owned(), lines));
    all.push(("byte by byte".to_owned(), (1..input.len()).collect()));
    if input.len() <= 4096 {
        for at in 1..input.len() {
            all.push((format!("split at {at}"), vec![at]));
        }
    }
    for seed in 1..=16u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let max = 1 + (rng.next() % 64) as usize;
        let mut cuts = Vec::new();
        let mut at = 0;
        loop {
            at += 1 + (rng.next() as usize) % max;
            if at >= input.len() {
                break;
            }
            cuts.push(at);
        }
        all.push((format!("random seed {seed}"), cuts));
    }
    all
}

fn memchr_positions(input: &[u8]) -> impl Iterator<Item = usize> + '_ {
    input
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
}

/// The `.http` files of a corpus folder, sorted, with their `.json` beside them.
fn cases(kind: &str) -> Vec<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/requests")
        .join(kind);
    let mut found: Vec<(PathBuf, PathBuf)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "http"))
        .map(|p| {
            let json = p.with_extension("json");
            assert!(json.exists(), "{} has no .json", p.display());
            (p, json)
        })
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no cases in {}", dir.display());
    found
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compares one parsed request with its expectation; returns a description of the first
/// difference.
fn check_request(got: &Parsed, want: &Value) -> Result<(), String> {
    let head = &got.head;
    let field = |key: &str| {
        want.get(key)
            .unwrap_or_else(|| panic!("expectation lacks {key:?}"))
    };
    let mut diffs = Vec::new();
    let mut expect_bytes = |key: &str, actual: &[u8]| {
        if let Some(v) = want.get(key) {
            let expected = latin1(v, key);
            if expected != actual {
                diffs.push(format!(
                    "{key}: got {:?}, want {:?}",
                    String::from_utf8_lossy(actual),
                    String::from_utf8_lossy(&expected)
                ));
            }
        }
    };
    expect_bytes("method", head.method.as_bytes());
    expect_bytes("target", &head.target);
    expect_bytes("path", &head.path);
    expect_bytes("query", &head.query);
    expect_bytes("body", &got.body);
    let version = match head.version {
        Version::Http10 => "1.0",
        Version::Http11 => "1.1",
    };
    if field("version").as_str() != Some(version) {
        diffs.push(format!("version: got {version}, want {}", field("version")));
    }
    let headers: Vec<(Vec<u8>, Vec<u8>)> = field("headers")
        .as_array()
        .expect("headers is a list")
        .iter()
        .map(|pair| {
            let pair = pair.as_array().expect("a header is [name, value]");
            (
                latin1(&pair[0], "header name"),
                latin1(&pair[1], "header value"),
            )
        })
        .collect();
    let actual: Vec<(Vec<u8>, Vec<u8>)> = head
        .headers
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.clone()))
        .collect();
    if headers != actual {
        diffs.push(format!("headers: got {:?}", head.headers));
    }
    let flag = |key: &str, default: bool| want.get(key).and_then(Value::as_bool).unwrap_or(default);
    if flag("keep_alive", true) != head.keep_alive {
        diffs.push(format!("keep_alive: got {}", head.keep_alive));
    }
    if flag("expect_continue", false) != head.expect_continue {
        diffs.push(format!("expect_continue: got {}", head.expect_continue));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("; "))
    }
}

#[test]
fn valid_requests_parse_as_expected_at_every_chunking() {
    let mut failures = Vec::new();
    let all = cases("valid");
    for (http, json) in &all {
        let input = decode_http_file(http);
        let spec = read_json(json);
        let limits = limits_of(&spec);
        let wanted = spec["requests"].as_array().expect("requests is a list");
        for (how, cuts) in chunkings(&input) {
            let outcome = feed(&input, &cuts, &limits);
            let name = format!("{} ({how})", http.display());
            if let Some(error) = outcome.error {
                failures.push(format!("{name}: refused with {} ({error})", error.status()));
                continue;
            }
            if outcome.leftover != 0 {
                failures.push(format!(
                    "{name}: {} bytes left incomplete",
                    outcome.leftover
                ));
            }
            if outcome.requests.len() != wanted.len() {
                failures.push(format!(
                    "{name}: {} requests, want {}",
                    outcome.requests.len(),
                    wanted.len()
                ));
                continue;
            }
            for (i, (got, want)) in outcome.requests.iter().zip(wanted).enumerate() {
                if let Err(diff) = check_request(got, want) {
                    failures.push(format!("{name}: request {i}: {diff}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures[..failures.len().min(40)].join("\n")
    );
    assert!(all.len() >= 40, "the valid corpus shrank to {}", all.len());
}

#[test]
fn invalid_requests_are_refused_with_their_status_at_every_chunking() {
    let mut failures = Vec::new();
    let all = cases("invalid");
    for (http, json) in &all {
        let input = decode_http_file(http);
        let spec = read_json(json);
        let limits = limits_of(&spec);
        let status = spec["status"].as_u64().expect("status is a number");
        let before = spec
            .get("requests_before")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        for (how, cuts) in chunkings(&input) {
            let outcome = feed(&input, &cuts, &limits);
            let name = format!("{} ({how})", http.display());
            match outcome.error {
                None => failures.push(format!(
                    "{name}: accepted ({} requests, {} bytes pending)",
                    outcome.requests.len(),
                    outcome.leftover
                )),
                Some(error) if u64::from(error.status()) != status => failures.push(format!(
                    "{name}: status {} ({error}), want {status}",
                    error.status()
                )),
                Some(_) if outcome.requests.len() as u64 != before => failures.push(format!(
                    "{name}: {} requests before the error, want {before}",
                    outcome.requests.len()
                )),
                Some(_) => {}
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures[..failures.len().min(40)].join("\n")
    );
    assert!(
        all.len() >= 50,
        "the invalid corpus shrank to {}",
        all.len()
    );
}
